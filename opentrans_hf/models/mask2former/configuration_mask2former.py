"""Configuration of the Mask2Former-style open-vocabulary framework."""

from __future__ import annotations

from transformers import Mask2FormerConfig

from opentrans_hf.models.backbone import PYRAMID_SCALES
from opentrans_hf.models.configuration_ovs import OVSConfig, SolverConfig

MASK_LOSS_IGNORED = ("exclude", "background")
"""What the mask loss does with pixels labelled ``ignore_index``: ``exclude`` them (no mask is supervised
there), or count them as ``background`` of every matched query's mask (Mask2Former's reference, which has no
ignored pixels inside its targets' images)."""


class CLIPMask2FormerConfig(OVSConfig):
    """Mask2Former-style: transformers' Mask2Former pixel decoder, transformer decoder and loss.

    Args:
        mask_loss_ignored: pixels labelled ``ignore_index`` in the mask loss (and the matching cost):
            ``"exclude"`` (default) or ``"background"`` (see :data:`MASK_LOSS_IGNORED`). On a benchmark with
            held-out classes, their pixels are ignored in training; as background they teach every mask to
            avoid the unseen classes, which then fall with longer training.
        (the other settings size transformers' Mask2Former blocks and weigh its loss terms.)
    """

    model_type = "opentrans_clip_mask2former"
    solver = SolverConfig(learning_rate=1e-4, backbone_multiplier=0.1, weight_decay=0.05, weight_decay_norm=0.0,
                          weight_decay_embed=0.0, lr_scheduler_type="polynomial", warmup_steps=10, poly_power=0.9,
                          max_grad_norm=0.01)
    """Mask2Former's solver (its detectron2 configs): AdamW 1e-4, backbone x 0.1, weight decay 0.05 (0 for norms and
    embeddings), poly schedule (power 0.9) after a short warm-up, full-model gradient clipping at 0.01."""

    def __init__(self, num_queries: int = 16, hidden_dim: int = 64, mask_feature_size: int = 64,
                 encoder_layers: int = 1, decoder_layers: int = 3, num_attention_heads: int = 4,
                 dim_feedforward: int = 128, train_num_points: int = 1024, no_object_weight: float = 0.1,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 mask_loss_ignored: str = "exclude", **kwargs):
        if mask_loss_ignored not in MASK_LOSS_IGNORED:
            raise ValueError(f"mask_loss_ignored must be one of {MASK_LOSS_IGNORED}, got {mask_loss_ignored!r}")
        self.mask_loss_ignored = mask_loss_ignored
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.mask_feature_size = mask_feature_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_attention_heads = num_attention_heads
        self.dim_feedforward = dim_feedforward
        self.train_num_points = train_num_points
        self.no_object_weight = no_object_weight
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        if kwargs.get("learn_void_embedding") is False:
            raise ValueError("Mask2Former-style frameworks need the void ('no object') embedding: "
                             "learn_void_embedding cannot be False")
        kwargs["learn_void_embedding"] = True
        super().__init__(**kwargs)

    def mask2former_config(self, num_labels: int):
        """The ``Mask2FormerConfig`` for transformers' building blocks (sizes from this config)."""
        if self.fpn_channels % 32 or self.hidden_dim % 32:
            raise ValueError(f"fpn_channels ({self.fpn_channels}) and hidden_dim ({self.hidden_dim}) must be multiples "
                             "of 32 (Mask2Former's GroupNorm(32, ...))")
        strides = self.feature_strides
        return Mask2FormerConfig(
            feature_size=self.fpn_channels, mask_feature_size=self.mask_feature_size, hidden_dim=self.hidden_dim,
            encoder_feedforward_dim=self.dim_feedforward, encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers, num_attention_heads=self.num_attention_heads,
            dim_feedforward=self.dim_feedforward, num_queries=self.num_queries, num_labels=num_labels,
            train_num_points=self.train_num_points, no_object_weight=self.no_object_weight,
            class_weight=self.class_weight, mask_weight=self.mask_weight, dice_weight=self.dice_weight,
            ignore_value=self.ignore_index, feature_strides=strides, common_stride=strides[0], use_auxiliary_loss=True,
        )

    @property
    def feature_strides(self) -> list[int]:
        """Strides of the simple feature pyramid's levels in pixels: patch/4, patch/2, patch, 2 x patch (4/8/16/32
        for a patch-16 ViT, 2/4/8/16 for patch 8). transformers takes whole strides only; where patch/4 is not
        whole (patch 14, or the tests' patch 2) the same ratios from 1 (1/2/4/8), which builds the same blocks
        (only the ratios decide the pixel decoder's levels)."""
        patch = self.clip.vision_config.patch_size
        strides = [patch / s for s in PYRAMID_SCALES]
        if all(float(x).is_integer() for x in strides):
            return [int(x) for x in strides]
        return [int(round(x / strides[0])) for x in strides]
