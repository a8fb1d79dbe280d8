"""The CLIP ViT as a dense backbone: patch-token maps from chosen layers and a simple feature pyramid.

The ViT itself stays where it is (``clip.vision_model``) with its own parameter names, so sparse masks
and spectral-tuning configs made on a bare CLIP resolve inside every framework.
"""

from __future__ import annotations

import torch
from torch import nn

PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
"""Resampling of the ViT's patch grid per level (ViTDet's simple feature pyramid): strides
patch/4, patch/2, patch and 2*patch, i.e. 4/8/16/32 for a patch-16 ViT."""


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)


def check_pixel_values(pixel_values, num_channels: int = 3) -> torch.Tensor:
    """A (B, C, H, W) float tensor with C channels, or a ValueError naming the shape received."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have 4 dimensions (batch, channels, height, width), got shape "
                         f"{tuple(pixel_values.shape)}")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} channels (dim 1), got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a float tensor (normalised images), got {pixel_values.dtype}")
    return pixel_values


def vit_feature_maps(clip, pixel_values: torch.Tensor, layers: list[int]):
    """Patch-token maps (B, C, H/p, W/p) of the given ``hidden_states`` layers, and the vision output.

    Positional embeddings are interpolated, so any image size that is a multiple of the patch size works.
    """
    vision = clip.vision_model
    patch = vision.config.patch_size
    b, _, h, w = pixel_values.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the CLIP patch size {patch}")
    out = vision(pixel_values=pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
    gh, gw = h // patch, w // patch
    maps = []
    for i in layers:
        tokens = out.hidden_states[i][:, 1:, :]  # drop CLS
        maps.append(tokens.transpose(1, 2).reshape(b, -1, gh, gw))
    return maps, out


def clip_dense_embeddings(clip, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's own embedding of every patch token: ``visual_projection(post_layernorm(tokens))``, the path
    CLIP's pooled image embedding takes, applied per token; (B, N, hidden) -> (B, N, projection_dim).
    What dense zero-shot, FC-CLIP's out-of-vocabulary branch and DeepLabV3's CLIP residual score
    against the class text embeddings."""
    return clip.visual_projection(clip.vision_model.post_layernorm(tokens))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: deconvolutions up, max-pool down, then 1x1 + 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, scales=PYRAMID_SCALES):
        super().__init__()
        self.scales = tuple(scales)
        self.stages = nn.ModuleList()
        for s in self.scales:
            layers: list[nn.Module] = []
            dim = in_channels
            if s == 4.0:
                layers += [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), group_norm(dim // 2), nn.GELU(),
                           nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                dim //= 4
            elif s == 2.0:
                layers += [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
                dim //= 2
            elif s == 0.5:
                layers += [nn.MaxPool2d(2, ceil_mode=True)]
            elif s != 1.0:
                raise ValueError(f"unsupported pyramid scale {s}; use 4, 2, 1 or 0.5")
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), group_norm(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), group_norm(out_channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """One input map per level (high to low resolution out)."""
        return [stage(x) for stage, x in zip(self.stages, maps)]
