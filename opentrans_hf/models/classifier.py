"""The open-vocabulary classifier: class names -> CLIP text embeddings (prompt ensemble), cosine scores."""

from __future__ import annotations

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
        groups = [class_synonyms(n) for n in names]
        if self.name_aggregation == "first":
            groups = [g[:1] for g in groups]
        flat = [name for g in groups for name in g]
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            prompts = [t.format(n) for t in self.templates for n in flat]
            max_len = clip.config.text_config.max_position_embeddings
            tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            feats = clip.get_text_features(**tok)
            feats = getattr(feats, "pooler_output", feats)
            feats = F.normalize(feats.float(), dim=-1).view(len(self.templates), len(flat), -1)
            per_name = F.normalize(feats.mean(0), dim=-1)  # (N, D): one embedding per name
            starts = [0]
            for g in groups:
                starts.append(starts[-1] + len(g))
            if max(len(g) for g in groups) == 1:
                emb = per_name
            elif self.name_aggregation == "mean":
                emb = F.normalize(torch.stack([per_name[a:b].mean(0) for a, b in zip(starts, starts[1:])]), dim=-1)
            else:  # max: (K, M, D), short classes padded with their first name (the max is unchanged)
                m = max(len(g) for g in groups)
                index = torch.tensor([[a + min(j, b - a - 1) for j in range(m)] for a, b in zip(starts, starts[1:])],
                                     device=per_name.device)
                emb = per_name[index]
        if not trainable:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = emb
        return emb

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
