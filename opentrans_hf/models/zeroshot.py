"""Training-free dense zero-shot segmentation with a bare CLIP: the baseline every OVS framework must beat.

Every patch token of the image encoder's last layer goes through CLIP's own ``post_layernorm`` and
``visual_projection`` (the path CLIP's pooled embedding takes) and is scored by cosine against the class
text embeddings (the OVS classifier's prompt ensemble) at CLIP's logit scale; the patch scores are
upsampled bilinearly to the image. Nothing is trained: how much of a CLIP's open-vocabulary knowledge
reaches the patch level, the starting point of dense OVS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from opentrans_hf.models.backbone import check_pixel_values, clip_dense_embeddings, vit_feature_maps
from opentrans_hf.models.classifier import OpenVocabClassifier, check_class_names, class_scores
from opentrans_hf.models.configuration_ovs import DEFAULT_TEMPLATES
from opentrans_hf.utils.hub import load_or_explain, quiet_loading


def dense_class_logits(clip, tokens: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """(B, N, K) cosine logits, at CLIP's logit scale, of patch tokens (B, N, hidden) of the image
    encoder's last layer against L2-normalised class text embeddings ((K, D), or (K, M, D) with synonyms:
    see :func:`~opentrans_hf.models.classifier.class_scores`)."""
    dense = F.normalize(clip_dense_embeddings(clip, tokens).float(), dim=-1)
    return clip.logit_scale.exp() * class_scores(dense, class_embeddings)


class CLIPDenseZeroShot(nn.Module):
    """``CLIPDenseZeroShot(clip, tokenizer)``: ``predict(pixel_values, class_names)`` -> (B, H, W) class
    indices, like the frameworks' ``predict`` (so the same evaluation code scores it)."""

    def __init__(self, clip, tokenizer, templates: list[str] | None = None):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.classifier = OpenVocabClassifier(list(templates or DEFAULT_TEMPLATES), clip.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path: str, templates: list[str] | None = None) -> "CLIPDenseZeroShot":
        """From a CLIP checkpoint (local dir or Hub id) with its tokenizer."""
        with quiet_loading():
            clip = load_or_explain(path, lambda: CLIPModel.from_pretrained(path, use_safetensors=True), "CLIP model")
            return cls(clip, AutoTokenizer.from_pretrained(path), templates).eval()

    @torch.no_grad()
    def patch_logits(self, pixel_values: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """(B, K, H/p, W/p) cosine logits of every patch against the classes."""
        pixel_values = check_pixel_values(pixel_values)
        names = check_class_names(class_names)
        (fmap,), _ = vit_feature_maps(self.clip, pixel_values, [-1])
        b, _, gh, gw = fmap.shape
        text = self.classifier.class_embeddings(self.clip, self.tokenizer, names)
        logits = dense_class_logits(self.clip, fmap.flatten(2).transpose(1, 2), text)
        return logits.transpose(1, 2).reshape(b, len(names), gh, gw)

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, class_names: list[str], allow_void: bool = False) -> torch.Tensor:
        """(B, H, W) class indices (there is no void class; ``allow_void`` is accepted for the frameworks'
        signature)."""
        logits = self.patch_logits(pixel_values, class_names)
        return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
