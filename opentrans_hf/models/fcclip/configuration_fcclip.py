"""Configuration of the FC-CLIP-style open-vocabulary framework."""

from __future__ import annotations

from opentrans_hf.models.configuration_ovs import _saved_default
from opentrans_hf.models.mask2former.configuration_mask2former import CLIPMask2FormerConfig

CLASS_HEADS = ("mlp", "linear")
MASK_POOLINGS = ("binary", "soft")


class CLIPFCCLIPConfig(CLIPMask2FormerConfig):
    """FC-CLIP-style: the Mask2Former variant plus the out-of-vocabulary branch and geometric ensemble.

    Args:
        ensemble_alpha: weight of the out-of-vocabulary probability for classes seen in training (0.4).
        ensemble_beta: its weight for unseen classes (0.8).
        freeze_clip_encoder: keep the whole CLIP image encoder frozen (FC-CLIP's design, default True): the
            out-of-vocabulary branch works because the frozen features stay aligned with the text
            embeddings; trained on the seen classes they drift out of the text space. The heads train on
            the frozen features (a sparse mask applied to the encoder stays in force).
        class_head: ``"mlp"`` (FC-CLIP's, default): a 3-layer MLP on the query embedding plus the query's
            mask-pooled pixel features (``LayerNorm`` + ``Linear``), per decoder layer; ``"linear"``: one Linear
            on the query embedding (the Mask2Former variant's head).
        mask_pooling: how the out-of-vocabulary branch pools the CLIP's dense features under each query's
            mask: ``"binary"`` (FC-CLIP's: mask logits > 0, average; a query with an empty mask gets no
            out-of-vocabulary term, its in-vocabulary scores stand) or ``"soft"`` (sigmoid-weighted average).
        (``seen_class_names``, from :class:`OVSConfig`, decide which classes count as seen.)
    """

    model_type = "opentrans_clip_fcclip"
    # solver: inherited, Mask2Former's (FC-CLIP's configs inherit it); with the frozen encoder the multiplier is moot

    def __init__(self, ensemble_alpha: float = 0.4, ensemble_beta: float = 0.8, **kwargs):
        for name, v in (("ensemble_alpha", ensemble_alpha), ("ensemble_beta", ensemble_beta)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.ensemble_alpha = ensemble_alpha
        self.ensemble_beta = ensemble_beta
        # FC-CLIP's design; a config.json written before these settings existed loads as it was trained
        self.freeze_clip_encoder = bool(_saved_default(kwargs, "freeze_clip_encoder", True, False))
        self.class_head = _saved_default(kwargs, "class_head", "mlp", "linear")
        self.mask_pooling = _saved_default(kwargs, "mask_pooling", "binary", "soft")
        if self.class_head not in CLASS_HEADS:
            raise ValueError(f"class_head must be one of {CLASS_HEADS}, got {self.class_head!r}")
        if self.mask_pooling not in MASK_POOLINGS:
            raise ValueError(f"mask_pooling must be one of {MASK_POOLINGS}, got {self.mask_pooling!r}")
        super().__init__(**kwargs)
