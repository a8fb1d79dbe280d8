"""Parameters and multiply-accumulates of a CLIP image encoder, dense and with a sparse mask.

The Params / FLOPs columns of the paper's tables: "effective" counts only the weights a mask keeps
(unstructured sparsity: a layer with density d costs d of its dense MACs on sparse hardware/kernels).
MACs are measured on a real forward pass: Linear/Conv layers by forward hooks, everything else that
multiplies matrices (attention) by ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from opentrans_hf.methods.sparse_mask.layer import _BUFFER
from opentrans_hf.utils.flops import flop_counter

if TYPE_CHECKING:
    from opentrans_hf.methods.sparse_mask.mask import SparseMask
from opentrans_hf.utils.naming import canonical_name


def vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP vision tower inside ``model``: the model itself for ``CLIPVisionModel``, else the first
    submodule whose name ends in ``vision_model``; other models are counted whole."""
    if type(model).__name__ in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
        return model
    for name, m in model.named_modules():
        if name.split(".")[-1] == "vision_model":
            return m
    return model


def count_params_and_flops(model: nn.Module, mask: SparseMask | None = None, image_size: int | None = None) -> dict:
    """Dense and effective parameters and MACs of ``model``'s vision tower for one image.

    ``mask``: a SparseMask to count as if applied (default: whatever mask is applied to the model, and
    weights that are exactly zero). ``image_size``: default the tower's configured size.
    """
    tower = vision_tower(model)
    cfg = getattr(tower, "config", None)
    size = image_size or getattr(cfg, "image_size", None) or 224
    keep = {}
    if mask is not None:
        keep = {canonical_name(n): m for n, m in mask.masks.items()}
    layer_macs: dict[str, int] = {}
    density: dict[str, float] = {}
    handles = []
    for name, m in tower.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            density[name] = _layer_density(name, m, keep)
            handles.append(m.register_forward_hook(_mac_hook(name, layer_macs)))
    total_macs = _forward_flops(tower, cfg, size, handles) // 2
    param_macs = sum(layer_macs.values())
    other_macs = max(total_macs - param_macs, 0)
    effective_layer = {n: layer_macs[n] * density[n] for n in layer_macs}
    params = sum(p.numel() for p in tower.parameters())
    pruned = 0
    for name, m in tower.named_modules():
        if name in density:
            pruned += round((1 - density[name]) * m.weight.numel())
    return {
        "image_size": size,
        "params": params,
        "effective_params": params - pruned,
        "macs": param_macs + other_macs,
        "effective_macs": int(round(sum(effective_layer.values()) + other_macs)),
        "layer_macs": layer_macs,
        "layer_density": density,
        "attention_and_other_macs": other_macs,
    }


def _layer_density(name: str, module: nn.Module, keep: dict) -> float:
    """The fraction of ``module``'s weights that are non-zero and kept: by ``keep`` (canonical names), else
    by the mask applied to it."""
    w = module.weight.detach()
    k = keep.get(canonical_name(f"{name}.weight"))
    if k is None:
        k = getattr(module, _BUFFER.format("weight"), None)
    nz = (w != 0) if k is None else ((w != 0) & k.to(w.device))
    return float(nz.sum()) / w.numel()


def _mac_hook(name: str, layer_macs: dict[str, int]):
    """A forward hook adding a Linear/Conv layer's multiply-accumulates to ``layer_macs[name]``."""

    def hook(mod, args, out):
        if isinstance(mod, nn.Linear):
            layer_macs[name] = layer_macs.get(name, 0) + out.numel() * mod.in_features
        else:
            per_out = mod.in_channels // mod.groups
            for ks in mod.kernel_size:
                per_out *= ks
            layer_macs[name] = layer_macs.get(name, 0) + out.numel() * per_out

    return hook


def _forward_flops(tower: nn.Module, cfg, size: int, handles: list) -> int:
    """The FLOPs of one forward pass of a blank ``size`` x ``size`` image (the hooks in ``handles`` run,
    then are removed)."""
    device = next(tower.parameters()).device
    pixel_values = torch.zeros(1, 3, size, size, device=device)
    kwargs = {}
    if cfg is not None and getattr(cfg, "image_size", size) != size:
        kwargs["interpolate_pos_encoding"] = True
    try:
        with torch.no_grad(), flop_counter() as counter:
            tower(pixel_values=pixel_values, **kwargs) if cfg is not None else tower(pixel_values)
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops()
