"""FC-CLIP-style OVS: the Mask2Former variant plus the out-of-vocabulary branch on the CLIP's own
dense features, combined with the in-vocabulary scores by FC-CLIP's geometric ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opentrans_hf.models.backbone import clip_dense_embeddings
from opentrans_hf.models.classifier import class_scores
from opentrans_hf.models.fcclip.configuration_fcclip import CLIPFCCLIPConfig
from opentrans_hf.models.mask2former.modeling_mask2former import CLIPMask2FormerForOVS


def geometric_ensemble(p_in: torch.Tensor, p_out: torch.Tensor, seen: torch.Tensor, alpha: float, beta: float,
                       void: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """FC-CLIP's ensemble: ``p_in^(1-a) * p_out^a`` with ``a = alpha`` for seen classes and ``beta`` for
    unseen ones, renormalised over the K classes, times ``1 - p(void)``; returns (..., K + 1) with p(void) last.

    ``p_in``/``p_out``: (..., K) in-/out-of-vocabulary class probabilities; ``seen``: (K,) bool;
    ``void``: (..., 1) the in-vocabulary void probability; ``valid``: (..., 1) bool, False where the query's
    mask is empty (FC-CLIP's ``ensemble_on_valid_mask``: ``a = 0`` there, the in-vocabulary scores stand).
    """
    eps = 1e-8
    a = torch.where(seen, torch.as_tensor(alpha, dtype=p_in.dtype), torch.as_tensor(beta, dtype=p_in.dtype))
    if valid is not None:
        a = a * valid.to(p_in.dtype)
    log_p = (1 - a) * torch.log(p_in + eps) + a * torch.log(p_out + eps)
    return torch.cat([log_p.softmax(-1) * (1 - void), void], -1)


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """FC-CLIP's ``MaskPooling``: the average of ``features`` (B, C, h, w) under each binary mask
    ``mask_logits > 0`` (B, Q, h', w', resized to the features' grid) -> (B, Q, C); an empty mask pools to 0."""
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
    m = (mask_logits > 0).to(features.dtype)
    return torch.einsum("bchw,bqhw->bqc", features, m / (m.sum((-2, -1), keepdim=True) + 1e-8))


class CLIPFCCLIPForOVS(CLIPMask2FormerForOVS):
    """FC-CLIP on a CLIP ViT.

    The CLIP image encoder is frozen (``config.freeze_clip_encoder``, FC-CLIP's design). The in-vocabulary
    class head is FC-CLIP's (``config.class_head="mlp"``): an MLP on each query embedding plus its
    mask-pooled pixel features. Training is the Mask2Former loss of the in-vocabulary head. At inference
    (``model.eval()``), every query's binary mask (``config.mask_pooling``) also pools the CLIP's dense features (``visual_projection(post_layernorm(tokens))``
    of the last layer, computed in the same forward, without gradient), which are scored against the
    class text embeddings with CLIP's own logit scale; the two class distributions are combined by
    :func:`geometric_ensemble` (``ensemble_alpha`` for classes in ``config.seen_class_names``,
    ``ensemble_beta`` for the others) and multiplied by the in-vocabulary non-void probability.

    The OOV branch sees the encoder as it is: frozen CLIP in FC-CLIP, the pruned and/or spectrally
    tuned encoder here when a mask or spectral tuning is applied.
    """

    config_class = CLIPFCCLIPConfig

    def __init__(self, config: CLIPFCCLIPConfig, tokenizer=None, image_processor=None):
        super().__init__(config, tokenizer=tokenizer, image_processor=image_processor)
        if config.class_head == "mlp":  # FC-CLIP's: MLP(query + projected mask-pooled pixel features)
            hidden, mask_dim = config.hidden_dim, config.mask_feature_size
            self.mask_pool_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden))
            self.class_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                             nn.Linear(hidden, config.clip.projection_dim))
            self.post_init()

    def freeze_unused_clip_parameters(self) -> list[str]:
        """As every framework, and with ``config.freeze_clip_encoder`` the whole CLIP image encoder (FC-CLIP)."""
        if getattr(self.config, "freeze_clip_encoder", False):
            for p in self.clip.vision_model.parameters():
                p.requires_grad_(False)
        return super().freeze_unused_clip_parameters()

    def query_class_embeddings(self, hidden, masks, mask_features):
        if self.config.class_head != "mlp":
            return super().query_class_embeddings(hidden, masks, mask_features)
        query = hidden.transpose(0, 1)  # (B, Q, C)
        pooled = mask_pool(mask_features, masks)  # FC-CLIP pools the mask features under binary masks
        return self.class_embed(query + self.mask_pool_proj(pooled))

    def out_of_vocabulary_probabilities(self, mask_logits, vision_out, text, grid):
        """(B, Q, K) mask-pooled dense CLIP features classified against the text embeddings, and (B, Q, 1)
        whether the query's mask covers any of the feature grid (always True for soft pooling)."""
        with torch.no_grad():
            clip = self.clip
            tokens = vision_out.last_hidden_state[:, 1:, :]
            dense = clip_dense_embeddings(clip, tokens)  # (B, N, D)
            b, _, d = dense.shape
            gh, gw = grid
            dense = dense.transpose(1, 2).reshape(b, d, gh, gw)
            m = F.interpolate(mask_logits.float(), size=(gh, gw), mode="bilinear", align_corners=False)
            if self.config.mask_pooling == "binary":
                pooled = mask_pool(dense.float(), m)
                valid = (m > 0).flatten(2).any(-1, keepdim=True)
            else:
                m = m.sigmoid()
                pooled = torch.einsum("bqhw,bdhw->bqd", m, dense.float()) / (m.sum((-2, -1))[..., None] + 1e-6)
                valid = torch.ones(*m.shape[:2], 1, dtype=torch.bool, device=m.device)
            logits = clip.logit_scale.exp() * class_scores(F.normalize(pooled, dim=-1), text)
            return logits.softmax(-1), valid

    def class_probabilities(self, class_logits, mask_logits, vision_out, text, seen_classes, grid) -> torch.Tensor:
        k = text.shape[0]
        if self.training:
            return class_logits.softmax(-1)[..., :k]
        p_all = class_logits.softmax(-1)
        p_in = class_logits[..., :k].softmax(-1)
        p_out, valid = self.out_of_vocabulary_probabilities(mask_logits, vision_out, text, grid)
        # a class counts as seen when any of its names is a training class (FC-CLIP's category overlap):
        # forward computes it from the names, or takes it from OVSProcessor's seen_classes
        if seen_classes is None:
            if self.config.seen_class_names:
                raise ValueError("FC-CLIP's ensemble needs seen_classes= ((K,) bool: which classes are training "
                                 "classes) with input_ids/class_embeddings; OVSProcessor(text=...) returns it")
            seen_classes = torch.zeros(k, dtype=torch.bool)
        seen = seen_classes.to(class_logits.device)
        probs = geometric_ensemble(p_in, p_out.to(p_in.dtype), seen, self.config.ensemble_alpha,
                                   self.config.ensemble_beta, p_all[..., -1:], valid)
        return probs[..., :k]
