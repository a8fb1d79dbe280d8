"""Configuration of the DeepLabV3-style open-vocabulary framework."""

from __future__ import annotations

from opentrans_hf.models.configuration_ovs import OVSConfig, SolverConfig


class CLIPDeepLabV3Config(OVSConfig):
    """DeepLabV3-style: ASPP on the stride-16 map, per-pixel embeddings scored against class texts."""

    model_type = "opentrans_clip_deeplabv3"
    solver = SolverConfig(learning_rate=1e-3, backbone_multiplier=1.0, weight_decay=0.01, weight_decay_norm=0.01,
                          weight_decay_embed=0.01, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=None)
    """AdamW 1e-3 for head and encoder, linear decay: measured on the embedded benchmark (the dense CLIP's own
    classifier is the starting point, ``clip_residual``), where it reaches the dense CLIP's zero-shot."""

    def __init__(self, aspp_channels: int = 64, atrous_rates: tuple[int, ...] = (2, 4, 6), clip_residual: bool = False,
                 **kwargs):
        """``clip_residual``: the per-pixel embedding is CLIP's own dense embedding of the last layer
        (``visual_projection(post_layernorm(tokens))``, CLIP's weights, frozen) plus the ASPP branch, whose
        last projection starts at zero: the untrained model is the training-free dense zero-shot CLIP, and
        training on the seen classes corrects it instead of learning a map to the text space from scratch
        (which keeps a pretrained CLIP's knowledge of the unseen classes)."""
        self.aspp_channels = aspp_channels
        self.atrous_rates = list(atrous_rates)
        self.clip_residual = bool(clip_residual)
        super().__init__(**kwargs)
