"""One layer under a mask: the mask's buffer and the hooks that keep the masked weights zero through the
forward and the gradient, their removal, the bit packing of the stored masks, and the layers a pruning
criterion may touch. The rest of :mod:`opentrans_hf.methods.sparse_mask` builds on this module, which
builds on none of them."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from opentrans_hf.utils.matching import Patterns, is_selected, normalize_patterns
from opentrans_hf.utils.naming import resolve_name, vision_encoder_targets

_BUFFER = "_sparse_mask_{}"  # non-persistent buffer on the owning module: state_dict keys do not change
_HOOK_ATTR = "_sparse_mask_hooks"
CLIP_ENCODER_TARGETS = vision_encoder_targets(stem=False)
"""Every Linear of the CLIP image encoder's blocks: the patch embedding (the stem) and the text tower are spared."""


def resolve_parameter(model: nn.Module, name: str, params: dict[str, nn.Parameter] | None = None) -> str | None:
    """The model's own name for canonical ``name``: as is, then with the ``vision_model.`` /
    ``clip.vision_model.`` prefixes, then any parameter ending in ``vision_model.<name>`` (must be unique)."""
    params = params if params is not None else dict(model.named_parameters())
    return resolve_name(name, params, what="mask entry", owner=f"{type(model).__name__}'s parameters")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ceil(numel / 8) bytes (``numpy.packbits``, big-endian bit order)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy().astype(np.uint8)))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool)).reshape(shape)


def current_mask(module: nn.Module, pname: str = "weight") -> torch.Tensor | None:
    """The mask applied to ``module.<pname>``, or None."""
    return getattr(module, _BUFFER.format(pname), None)


def install_hooks(module: nn.Module, pname: str) -> None:
    """Keep ``module.<pname>`` multiplied by its mask buffer in every forward and its gradient masked."""
    hooks = module.__dict__.setdefault(_HOOK_ATTR, {})
    if pname in hooks:
        return
    # keep the hook's id, not its handle: a deepcopy copies the module's hook dict with the same ids,
    # while a handle would keep pointing at the original module
    hooks[pname] = module.register_forward_pre_hook(make_pre_hook(pname)).id


def make_pre_hook(pname: str):
    key = _BUFFER.format(pname)

    def hook(module, args):
        mask = getattr(module, key)
        param = getattr(module, pname)
        with torch.no_grad():
            param.mul_(mask)
        if param.requires_grad and torch.is_grad_enabled() and getattr(param, "_sparse_mask_grad_hook", None) is not module:
            # registered on first use (and again on a deepcopy, whose parameter is a new object)
            param.register_hook(lambda g, m=module: g * getattr(m, key) if hasattr(m, key) else g)
            param._sparse_mask_grad_hook = module
        return None

    return hook


def remove_hooks(module: nn.Module, *, bake: bool = True, name: str = "") -> int:
    """Take the mask hooks and buffers off one module; returns how many parameters were unmasked.
    ``bake=True`` keeps the pruned weights at zero; ``bake=False`` restores the values they had when the mask
    was applied (needs ``SparseMask.apply(..., keep_pruned=True)``)."""
    hooks = module.__dict__.get(_HOOK_ATTR)
    if not hooks:
        return 0
    for pname, hook_id in list(hooks.items()):
        key = _BUFFER.format(pname)
        if not bake:
            if not hasattr(module, key + "_pruned"):
                raise ValueError(f"cannot restore {name + '.' if name else ''}{pname}: apply the mask with keep_pruned=True")
            with torch.no_grad():
                getattr(module, pname).copy_(getattr(module, key + "_pruned"))
        for k in (key, key + "_pruned"):
            if hasattr(module, k):
                delattr(module, k)
        module._forward_pre_hooks.pop(hook_id, None)
    delattr(module, _HOOK_ATTR)
    return len(hooks)


def prunable_layers(model: nn.Module, target_modules: Patterns = None, exclude_modules: Patterns = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the Linear/Conv layers to prune, in ``named_modules()`` order.

    Default (``target_modules=None``): the CLIP image encoder's blocks when the model has them;
    otherwise every Linear/Conv layer except the first convolution (the stem, as the paper)."""
    target_modules = normalize_patterns(target_modules)
    exclude_modules = normalize_patterns(exclude_modules)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if target_modules is None:
        clip = [(n, m) for n, m in layers if is_selected(n, CLIP_ENCODER_TARGETS, exclude_modules)]
        if clip:
            return clip
        first_conv = next((n for n, m in layers if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
        return [(n, m) for n, m in layers if n != first_conv and is_selected(n, None, exclude_modules)]
    chosen = [(n, m) for n, m in layers if is_selected(n, target_modules, exclude_modules)]
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no "
                         f"Linear/Conv layer of {type(model).__name__}")
    return chosen
