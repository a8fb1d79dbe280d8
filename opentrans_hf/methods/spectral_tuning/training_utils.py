"""Helpers around a spectral-tuned training run: DDP's unused parameters, per-layer learning rates."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from opentrans_hf.methods.spectral_tuning.selection import module_of
from opentrans_hf.spectral import SpectralReport


def _loss_of(output) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    tensors = output.values() if isinstance(output, dict) else (output.to_tuple() if hasattr(output, "to_tuple") else output)
    return sum(t.float().sum() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def find_unused_parameters(model: nn.Module, inputs: dict, loss_fn: Callable | None = None) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward/backward on ``inputs``
    (e.g. ``post_layernorm`` when a head reads ``last_hidden_state``): the parameters DDP fails on.
    Weights are not changed; gradients are restored to what they were."""
    saved = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    try:
        out = model(**inputs)
        loss = loss_fn(out) if loss_fn is not None else _loss_of(out)
        loss.backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]
    return unused


def freeze_unused_parameters(model: nn.Module, inputs: dict, loss_fn: Callable | None = None) -> list[str]:
    """Freeze what :func:`find_unused_parameters` finds (call before ``accelerator.prepare``); returns the names.
    The alternative is ``DistributedDataParallelKwargs(find_unused_parameters=True)``, which costs a graph walk every step."""
    names = find_unused_parameters(model, inputs, loss_fn)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(False)
    return names


def spectral_param_groups(model: nn.Module, report: SpectralReport | dict, lr: float, min_scale: float = 0.5,
                          max_scale: float = 1.5, weight_decay: float = 0.0) -> list[dict]:
    """TempBalance-style optimizer groups: each analysed layer's learning rate is linear in its alpha,
    from ``min_scale * lr`` (smallest alpha) to ``max_scale * lr`` (largest); every other trainable
    parameter gets ``lr``. Frozen parameters are left out. Works with any torch optimizer.
    A fused q/k/v module uses the mean alpha of its parts."""
    if min_scale > max_scale:
        raise ValueError(f"min_scale {min_scale} > max_scale {max_scale}")
    layer_alphas = report.alphas if isinstance(report, SpectralReport) else dict(report)
    if not layer_alphas:
        raise ValueError("the report has no layer with an alpha")
    modules = dict(model.named_modules())
    per_module: dict[str, list[float]] = {}
    for layer, a in layer_alphas.items():
        per_module.setdefault(module_of(layer, set(modules)), []).append(a)
    mod_alpha = {m: sum(v) / len(v) for m, v in per_module.items()}
    lo, hi = min(mod_alpha.values()), max(mod_alpha.values())
    groups, seen = [], set()
    for m, a in mod_alpha.items():
        params = [p for p in modules[m].parameters(recurse=False) if p.requires_grad]
        seen.update(id(p) for p in modules[m].parameters(recurse=False))
        if not params:
            continue
        scale = min_scale if hi == lo else min_scale + (max_scale - min_scale) * (a - lo) / (hi - lo)
        groups.append({"params": params, "lr": lr * scale, "weight_decay": weight_decay, "name": m, "alpha": a})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups
