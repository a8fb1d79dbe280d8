"""The open-vocabulary classifier: class names -> CLIP text embeddings (prompt ensemble), cosine scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_class_names(class_names) -> list[str]:
    """A non-empty list of distinct, non-empty strings, or a ValueError saying what is wrong."""
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a list of names, got the string {class_names!r}")
    names = list(class_names) if class_names is not None else []
    if not names:
        raise ValueError("class_names is empty: give at least one class name")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"class_names[{i}] = {n!r} is not a non-empty string")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class_names has duplicates: {dup}")
    return names


class OpenVocabClassifier(nn.Module):
    """Scores embeddings against the CLIP text embeddings of class names given at call time.

    The text encoder is the one of the CLIP model passed to :meth:`class_embeddings` (the framework
    owns the CLIP, so its parameters are registered once). Each class embedding is the normalised
    mean of the normalised text features of every prompt template ("a photo of a {}." ...). With a
    frozen text encoder, embeddings are cached per class-name list (and dropped when the text weights
    change in place, e.g. by ``load_state_dict``).

    Parameters: a learned logit scale (log; ``exp`` clamped at 100 as in CLIP) and, optionally, a
    learned void/background embedding scored like one more class (the last logit).
    """

    def __init__(self, templates: list[str], embed_dim: int, logit_scale_init: float = math.log(1 / 0.07),
                 learn_void_embedding: bool = False):
        super().__init__()
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
        return (tuple(names), str(device), tuple(p.dtype for p in text_params),
                tuple((p.data_ptr(), p._version) for p in text_params))

    def class_embeddings(self, clip, tokenizer, class_names: list[str], *, trainable: bool = False) -> torch.Tensor:
        """(K, D) L2-normalised text embeddings of ``class_names`` (prompt-template ensemble)."""
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
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            prompts = [t.format(n) for t in self.templates for n in names]
            max_len = clip.config.text_config.max_position_embeddings
            tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            feats = clip.get_text_features(**tok)
            feats = getattr(feats, "pooler_output", feats)
            feats = F.normalize(feats.float(), dim=-1).view(len(self.templates), len(names), -1)
            emb = F.normalize(feats.mean(0), dim=-1)
        if not trainable:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = emb
        return emb

    def forward(self, embeddings: torch.Tensor, text_embeddings: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Cosine logits of ``embeddings`` (any shape with D along ``dim``) against the (K, D) text
        embeddings (+ the void embedding last): K (+1) along ``dim``."""
        x = F.normalize(embeddings.movedim(dim, -1).float(), dim=-1)
        t = text_embeddings.float()
        if self.void_embedding is not None:
            t = torch.cat([t, F.normalize(self.void_embedding.float(), dim=-1)[None]], 0)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return (scale * x @ t.t()).movedim(-1, dim)
