"""DeepLabV3-style OVS: ASPP on the CLIP ViT's stride-16 map, per-pixel embeddings, cosine scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from opentrans_hf.models.backbone import clip_dense_embeddings, group_norm, vit_feature_maps
from opentrans_hf.models.deeplabv3.configuration_deeplabv3 import CLIPDeepLabV3Config
from opentrans_hf.models.modeling_ovs import OVSPreTrainedModel, OVSSegmentationOutput, upsample


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, dilated 3x3 per rate, and image pooling, fused by a 1x1."""

    def __init__(self, in_channels: int, channels: int, rates):
        super().__init__()

        def branch(k, d):
            return nn.Sequential(nn.Conv2d(in_channels, channels, k, padding=0 if k == 1 else d, dilation=d, bias=False),
                                 group_norm(channels), nn.ReLU())

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False),
                                     group_norm(channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class CLIPDeepLabV3ForOVS(OVSPreTrainedModel):
    """DeepLabV3 on a CLIP ViT: ASPP on the last ``feature_layers`` map (stride = patch size, 16 for
    ViT-B/16), a 1x1 projection to CLIP's text space, cosine logits against the class text
    embeddings, bilinear upsampling to the input; cross-entropy with ``ignore_index``. With
    ``config.clip_residual`` the embedding is CLIP's own dense embedding plus that head (zero at
    initialisation)."""

    config_class = CLIPDeepLabV3Config

    def __init__(self, config: CLIPDeepLabV3Config, tokenizer=None, image_processor=None):
        super().__init__(config, tokenizer=tokenizer, image_processor=image_processor)
        hidden = config.clip.vision_config.hidden_size
        self.aspp = ASPP(hidden, config.aspp_channels, config.atrous_rates)
        self.pixel_embed = nn.Conv2d(config.aspp_channels, config.clip.projection_dim, 1)
        self.post_init()

    @classmethod
    def from_clip(cls, clip_name_or_path, **kwargs) -> "CLIPDeepLabV3ForOVS":
        """As :meth:`OVSPreTrainedModel.from_clip`; new models start with ``clip_residual=True`` (CLIP's own
        dense classifier plus a head that learns corrections), unless told otherwise. The config's default
        stays False, so a model saved without the setting loads as it was trained."""
        kwargs.setdefault("clip_residual", True)
        return super().from_clip(clip_name_or_path, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "pixel_embed", None) and self.config.clip_residual:
            init.zeros_(module.weight)  # the residual branch starts silent: the model starts as CLIP's dense zero-shot
            init.zeros_(module.bias)

    @property
    def vision_layers_used(self) -> list[int]:
        return [self.hidden_state_indices()[-1] - 1]

    def forward_with_text(self, pixel_values, text, labels, seen_classes=None) -> OVSSegmentationOutput:
        (fmap,), _ = vit_feature_maps(self.clip, pixel_values, [self.hidden_state_indices()[-1]])
        emb = self.pixel_embed(self.aspp(fmap))
        if self.config.clip_residual:
            dense = clip_dense_embeddings(self.clip, fmap.flatten(2).transpose(1, 2))  # CLIP's own (frozen) path
            emb = emb + dense.transpose(1, 2).reshape_as(emb)
        logits = upsample(self.classifier(emb, text, dim=1), pixel_values.shape[-2:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels, ignore_index=self.config.ignore_index)
            if not torch.isfinite(loss):  # every pixel ignored: no signal, but keep the graph for DDP
                loss = logits.sum() * 0.0
        return OVSSegmentationOutput(loss=loss, logits=logits)
