"""The open-vocabulary classifier: class names -> CLIP text embeddings (prompt ensemble), cosine scores."""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

NAME_AGGREGATIONS = ("max", "mean", "first")


def class_synonyms(entry) -> tuple[str, ...]:
    """The names of one class entry: ``"sky"`` -> ``("sky",)``; ``("road", "street")`` as is (duplicates
    dropped, order kept)."""
    if isinstance(entry, str):
        return (entry,)
    return tuple(dict.fromkeys(entry))


def display_name(entry) -> str:
    """A class entry's name for people and reports: its first name."""
    return class_synonyms(entry)[0]


def check_class_names(class_names) -> list:
    """A non-empty list of classes, each a non-empty string or a non-empty list/tuple of non-empty strings
    (synonyms), no two the same; returned as strings and tuples. Classes may share a first name when
    their other names differ (ADE20K-847's three "bag"s). A ValueError says what is wrong."""
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a list of names, got the string {class_names!r}")
    entries = list(class_names) if class_names is not None else []
    if not entries:
        raise ValueError("class_names is empty: give at least one class name")
    names = []
    for i, n in enumerate(entries):
        if isinstance(n, (list, tuple)):
            if not n or not all(isinstance(x, str) and x.strip() for x in n):
                raise ValueError(f"class_names[{i}] = {n!r}: a class with synonyms needs a non-empty list of non-empty "
                                 "strings")
            n = class_synonyms(n)
            n = n[0] if len(n) == 1 else n
        elif not isinstance(n, str) or not n.strip():
            raise ValueError(f"class_names[{i}] = {n!r} is not a non-empty string (or a list of synonyms)")
        names.append(n)
    dup = sorted({", ".join(class_synonyms(n)) for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class_names has duplicates: {dup}")
    return names


def seen_class_flags(class_names, seen_names) -> torch.Tensor:
    """``(K,)`` bool: a class is seen when any of its names is one of ``seen_names`` (FC-CLIP's category overlap
    between the training and the evaluation vocabulary)."""
    seen = set(seen_names or [])
    return torch.tensor([not seen.isdisjoint(class_synonyms(n)) for n in check_class_names(class_names)],
                        dtype=torch.bool)


def class_scores(embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine scores (..., K) of L2-normalised ``embeddings`` (..., D) against class text embeddings:
    ``(K, D)``, or ``(K, M, D)`` for classes with up to M names (padded with repeats of a class's first
    name), where a class scores the maximum over its names (FC-CLIP's and OpenSeg's max ensemble)."""
    t = text_embeddings.float()
    if t.dim() == 2:
        return embeddings @ t.t()
    k, m, d = t.shape
    return (embeddings @ t.reshape(k * m, d).t()).unflatten(-1, (k, m)).amax(-1)


class OpenVocabClassifier(nn.Module):
    """Scores embeddings against the CLIP text embeddings of class names given at call time.

    The text encoder is the one of the CLIP model passed to :meth:`class_embeddings` (the framework
    owns the CLIP, so its parameters are registered once). Each class embedding is the normalised
    mean of the normalised text features of every prompt template ("a photo of a {}." ...). With a
    frozen text encoder, embeddings are cached per class-name list (and dropped when the text weights
    change in place, e.g. by ``load_state_dict``).

    A class may have several names (synonyms, ``("building", "edifice")``): each name gets its own
    template-ensemble embedding and, with ``name_aggregation="max"`` (the default, as FC-CLIP and OpenSeg
    score their class lists), the class scores the maximum over its names; ``"mean"`` averages the names'
    embeddings into one; ``"first"`` uses the first name only.

    Parameters: a learned logit scale (log; ``exp`` clamped at 100 as in CLIP) and, optionally, a
    learned void/background embedding scored like one more class (the last logit).
    """

    def __init__(self, templates: list[str], embed_dim: int, logit_scale_init: float = math.log(1 / 0.07),
                 learn_void_embedding: bool = False, name_aggregation: str = "max"):
        super().__init__()
        if name_aggregation not in NAME_AGGREGATIONS:
            raise ValueError(f"name_aggregation must be one of {NAME_AGGREGATIONS}, got {name_aggregation!r}")
        self.name_aggregation = name_aggregation
        self.templates = list(templates)
        self.embed_dim = embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.void_embedding = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim)) if learn_void_embedding else None
        self._cache: dict = {}

    @property
    def has_void(self) -> bool:
        return self.void_embedding is not None

    def clear_cache(self) -> None:
        self._cache.clear()

    def _cache_key(self, clip, names, device):
        text_params = [clip.text_projection.weight, clip.text_model.embeddings.token_embedding.weight]
        return (tuple(names), tuple(self.templates), self.name_aggregation, str(device), tuple(p.dtype for p in text_params),
                tuple((p.data_ptr(), p._version) for p in text_params))

    def class_embeddings(self, clip, tokenizer, class_names: list, *, trainable: bool = False) -> torch.Tensor:
        """L2-normalised text embeddings of ``class_names`` (prompt-template ensemble per name): ``(K, D)``,
        or ``(K, M, D)`` when some class has several names and ``name_aggregation`` is ``"max"`` (a class
        with fewer than M names repeats its first; see :func:`class_scores`)."""
        names = check_class_names(class_names)
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so class names cannot be encoded: load it with "
                             "from_clip/from_pretrained from a directory or Hub repo that has one, or set model.tokenizer")
        device = clip.text_projection.weight.device
        if not trainable:
            key = self._cache_key(clip, names, device)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        tok = tokenize_class_prompts(tokenizer, names, self.templates, clip.config.text_config.max_position_embeddings,
                                     self.name_aggregation)
        emb = self.embed_prompts(clip, tok["input_ids"], tok["attention_mask"], tok["class_ids"], trainable=trainable,
                                 cache=False)
        if not trainable:
            self._remember(key, emb)
        return emb

    def embed_prompts(self, clip, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      class_ids: torch.Tensor, *, trainable: bool = False, cache: bool = True) -> torch.Tensor:
        """Class embeddings from tokenized prompts (what :func:`tokenize_class_prompts` and ``OVSProcessor``
        give): ``input_ids`` ``(T * N, L)``, template-major (every name with the first template, then with the
        second, ...), ``class_ids`` ``(N,)`` the class of each name (non-decreasing, 0..K-1). Each name's
        embedding is the normalised mean of its T normalised prompt features; names of one class are combined
        by ``name_aggregation``. Cached by content when not ``trainable``."""
        device = clip.text_projection.weight.device
        class_ids = torch.as_tensor(class_ids).reshape(-1).long().cpu()
        n = class_ids.numel()
        if input_ids.dim() != 2 or n == 0 or input_ids.shape[0] % n:
            raise ValueError(f"input_ids must be (templates x names, length) for {n} names (class_ids), got shape "
                             f"{tuple(input_ids.shape)}")
        if bool((class_ids[1:] < class_ids[:-1]).any()) or int(class_ids[0]) != 0 or \
                bool((class_ids[1:] - class_ids[:-1] > 1).any()):
            raise ValueError(f"class_ids must number the classes 0, 1, ... in order (each class's names together), "
                             f"got {class_ids.tolist()}")
        if not trainable and cache:
            key = (_tensor_key(input_ids), _tensor_key(attention_mask), tuple(class_ids.tolist()), self.name_aggregation,
                   str(device), self._cache_key(clip, (), device)[-2:])
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        t = input_ids.shape[0] // n
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            tok = {"input_ids": input_ids.to(device)}
            if attention_mask is not None:
                tok["attention_mask"] = attention_mask.to(device)
            feats = clip.get_text_features(**tok)
            feats = getattr(feats, "pooler_output", feats)
            feats = F.normalize(feats.float(), dim=-1).view(t, n, -1)
            per_name = F.normalize(feats.mean(0), dim=-1)  # (N, D): one embedding per name
            counts = torch.bincount(class_ids).tolist()
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            if max(counts) == 1:
                emb = per_name
            elif self.name_aggregation == "mean":
                emb = F.normalize(torch.stack([per_name[a:b].mean(0) for a, b in zip(starts, starts[1:])]), dim=-1)
            elif self.name_aggregation == "first":
                emb = per_name[torch.tensor(starts[:-1], device=per_name.device)]
            else:  # max: (K, M, D), short classes padded with their first name (the max is unchanged)
                m = max(counts)
                index = torch.tensor([[a + min(j, b - a - 1) for j in range(m)] for a, b in zip(starts, starts[1:])],
                                     device=per_name.device)
                emb = per_name[index]
        if not trainable and cache:
            self._remember(key, emb)
        return emb

    def _remember(self, key, emb) -> None:
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = emb

    def forward(self, embeddings: torch.Tensor, text_embeddings: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Cosine logits of ``embeddings`` (any shape with D along ``dim``) against the class text
        embeddings from :meth:`class_embeddings` (+ the void embedding last): K (+1) along ``dim``."""
        x = F.normalize(embeddings.movedim(dim, -1).float(), dim=-1)
        t = text_embeddings.float()
        if self.void_embedding is not None:
            void = F.normalize(self.void_embedding.float(), dim=-1)
            void = void[None] if t.dim() == 2 else void[None, None].expand(1, t.shape[1], -1)
            t = torch.cat([t, void], 0)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return (scale * class_scores(x, t)).movedim(-1, dim)


def tokenize_class_prompts(tokenizer, class_names, templates, max_length: int | None = None,
                           name_aggregation: str = "max", return_tensors: str = "pt") -> dict:
    """Tokenize every prompt template with every name of ``class_names`` (names or tuples of synonyms):
    ``{"input_ids", "attention_mask"}`` of shape ``(T * N, L)``, template-major, and ``"class_ids"`` ``(N,)``,
    the class of each name (with ``name_aggregation="first"`` only the first name of each class is used).
    This is what :meth:`OpenVocabClassifier.embed_prompts` and the models' ``forward(input_ids=...)`` take."""
    names = check_class_names(class_names)
    groups = [class_synonyms(n) for n in names]
    if name_aggregation == "first":
        groups = [g[:1] for g in groups]
    flat = [name for g in groups for name in g]
    prompts = [t.format(n) for t in templates for n in flat]
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    tok = tokenizer(prompts, padding=True, return_tensors=return_tensors, **kwargs)
    class_ids = [k for k, g in enumerate(groups) for _ in g]
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "class_ids": torch.tensor(class_ids, dtype=torch.long)}


def _tensor_key(t: torch.Tensor | None):
    if t is None:
        return None
    t = t.detach().cpu()
    return (tuple(t.shape), str(t.dtype), hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest())
