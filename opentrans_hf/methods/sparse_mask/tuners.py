"""Masks under PEFT tuner layers: a masked layer wrapped by LoRA (or LoHa, LoKr, IA3) keeps its effective
weight sparse.

A tuner layer (``lora.Linear`` ...) holds the masked layer as its ``base_layer`` and adds a delta ΔW that
knows nothing of the mask. Here the tuner's delta is masked too, so the layer computes
``x @ ((W + ΔW) ⊙ M)^T + b`` (LoRA's dropout still acts on its own path only), its gradients reach the
adapter's factors only through the kept positions, and ``merge``/``merge_and_unload`` write
``(W + ΔW) ⊙ M``: the merged weights are exactly zero where the mask is. IA3 scales rows or columns of
``W ⊙ M``, which keeps its zeros by itself.

Either order works: ``mask.apply(peft_model)`` patches the tuner layers at once; a mask applied before
``get_peft_model`` leaves a forward pre-hook on each masked layer's parent (the module that holds it as
an attribute, the "slot"), which patches the tuner layer PEFT puts there on the first forward after.

Which tuner layers: LoRA on ``nn.Linear`` (no DoRA or other LoRA variant, no mixed-adapter batches),
LoHa and LoKr on any layer, IA3 on any layer. Others are refused with an error naming the layer.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from opentrans_hf.methods.sparse_mask.layer import _HOOK_ATTR, current_mask

_SLOTS_ATTR = "_sparse_mask_slots"  # on a masked layer's parent: {"hook": forward pre-hook id, "attrs": {attr: name}}
_TUNER_ATTR = "_sparse_mask_tuner"  # on a patched tuner layer: the instance attributes the patch set
_PEFT_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"
SUPPORTED = "LoRA on nn.Linear (no DoRA/variants), LoHa, LoKr, IA3"


def peft_free_name(name: str) -> str:
    """A parameter or module name as it was before PEFT wrapped the model: without the ``base_model.model.``
    prefix of a ``PeftModel`` and the ``.base_layer`` components of its tuner layers."""
    return name.removeprefix(_PEFT_PREFIX).replace(_BASE_LAYER + ".", ".").removesuffix(_BASE_LAYER)


def slot_of(name: str) -> str:
    """The name of the attribute slot a (possibly wrapped) layer sits in: ``name`` without trailing ``.base_layer``."""
    while name.endswith(_BASE_LAYER):
        name = name[: -len(_BASE_LAYER)]
    return name


def install_slot_hook(model: nn.Module, layer_name: str) -> None:
    """Watch the slot of the masked layer ``layer_name`` of ``model``: patch the tuner layer found there now,
    and on every forward of its parent (so a tuner layer PEFT puts there later is masked from its first call)."""
    slot = slot_of(layer_name)
    if not slot:
        return  # the model itself is the masked layer: nothing can wrap it in place
    parent_name, _, attr = slot.rpartition(".")
    parent = model.get_submodule(parent_name)
    state = parent.__dict__.get(_SLOTS_ATTR)
    if state is None:
        # keep the hook's id, not its handle: a deepcopy copies the dict with the same ids (see layer.py)
        state = parent.__dict__[_SLOTS_ATTR] = {"hook": parent.register_forward_pre_hook(_slot_pre_hook).id, "attrs": {}}
    state["attrs"][attr] = slot
    sync_slot(parent, attr, name=slot)


def _slot_pre_hook(parent: nn.Module, args) -> None:
    for attr, name in parent.__dict__[_SLOTS_ATTR]["attrs"].items():
        sync_slot(parent, attr, name=name)


def sync_slot(parent: nn.Module, attr: str, name: str = "") -> None:
    """Patch the tuner layer in ``parent.<attr>`` when it wraps a masked layer and is not patched yet."""
    occupant = parent._modules.get(attr)
    if occupant is None or _HOOK_ATTR in occupant.__dict__ or _TUNER_ATTR in occupant.__dict__:
        return  # gone, the masked layer itself (not wrapped), or patched already
    base = occupant._modules.get("base_layer")
    if base is None:
        return
    label = name or f"{type(parent).__name__}.{attr}"
    if current_mask(base) is None:
        inner = getattr(occupant, "get_base_layer", lambda: base)()
        if inner is not base and current_mask(inner) is not None:
            raise ValueError(f"{label}: nested PEFT tuner layers over a masked layer are not supported ({SUPPORTED})")
        return
    patch_tuner_layer(occupant, label)


def patch_tuner_layer(layer: nn.Module, name: str) -> None:
    """Make the tuner ``layer`` (whose base layer is masked) compute and merge ``(W + ΔW) ⊙ M``."""
    if "peft" not in sys.modules:
        raise TypeError(f"{name}: {type(layer).__name__} wraps a masked layer but is not a PEFT tuner layer ({SUPPORTED})")
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lycoris_utils import LycorisLayer

    patched: list[str] = []
    if isinstance(layer, IA3Layer):
        pass  # (W ⊙ M) scaled by rows or columns: the zeros stay, in the forward and in the merge
    elif isinstance(layer, LycorisLayer):  # LoHa, LoKr: their forward and merge both go through get_delta_weight
        patched = ["get_delta_weight"]
    elif isinstance(layer, LoraLinear):
        _check_lora_variants(layer, name)
        patched = ["get_delta_weight", "forward"]
    else:
        raise TypeError(f"{name}: a sparse mask cannot keep the weight of a {type(layer).__module__}."
                        f"{type(layer).__name__} sparse; supported tuner layers: {SUPPORTED}")
    for attr in patched:
        layer.__dict__[attr] = _Patched(layer, attr)
    layer.__dict__[_TUNER_ATTR] = {"attrs": patched, "name": name}


class _Patched:
    """``layer.<attr>`` replaced by the masked version: a plain object holding the layer (not a closure), so a
    ``deepcopy`` of the model carries it, bound to the copy."""

    def __init__(self, layer: nn.Module, attr: str):
        self.layer, self.attr = layer, attr

    def __call__(self, *args, **kwargs):
        return _PATCHES[self.attr](self.layer, *args, **kwargs)


def unpatch(model: nn.Module) -> int:
    """Take every slot hook and tuner patch of this module off ``model``; returns how many tuner layers were unpatched."""
    n = 0
    for module in model.modules():
        state = module.__dict__.pop(_SLOTS_ATTR, None)
        if state is not None:
            module._forward_pre_hooks.pop(state["hook"], None)
        patch = module.__dict__.pop(_TUNER_ATTR, None)
        if patch is not None:
            for attr in patch["attrs"]:
                module.__dict__.pop(attr, None)
            n += 1
    return n


def _check_lora_variants(layer: nn.Module, name: str) -> None:
    variants = getattr(layer, "lora_variant", None) or {}
    if variants:
        kinds = sorted({type(v).__name__ for v in variants.values()})
        raise ValueError(f"{name}: LoRA variants {kinds} (adapters {sorted(variants)}) renormalise the weight; a sparse "
                         "mask composes with plain LoRA only (use_dora=False)")


def _masked_delta_weight(self, adapter_name, *args, **kwargs) -> torch.Tensor:
    """The tuner's own delta weight, times the base layer's mask."""
    delta = type(self).get_delta_weight(self, adapter_name, *args, **kwargs)
    mask = current_mask(self.get_base_layer())
    return delta if mask is None else delta * mask.to(delta.device)


def _masked_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``lora.Linear.forward`` with each adapter's delta masked: ``base(x) + dropout(x) @ (ΔW ⊙ M)^T``
    (+ the LoRA bias when ``lora_bias``); the base layer's own hooks mask ``W``. Without dropout (LoRA's
    default, and whenever ``lora_dropout=0``) one matmul with ``(W + ΣΔW) ⊙ M``."""
    if kwargs.get("adapter_names") is not None:
        raise ValueError(f"{self.__dict__[_TUNER_ATTR]['name']}: mixed-adapter batches (adapter_names=...) are not "
                         "supported on a masked LoRA layer")
    if self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    _check_lora_variants(self, self.__dict__[_TUNER_ATTR]["name"])
    self._check_forward_args(x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    active = [a for a in self.active_adapters if a in self.lora_A]
    lora_bias = getattr(self, "lora_bias", {})
    base = self.base_layer
    mask = current_mask(base)
    plain_base = (type(base) is nn.Linear and not base._forward_hooks and len(base._forward_pre_hooks) == 1
                  and "forward" not in base.__dict__)  # only the mask's own hook (no offloading hooks ...)
    if (plain_base and mask is not None and not args and not kwargs
            and all(isinstance(self.lora_dropout[a], nn.Identity) and not lora_bias.get(a) for a in active)):
        # no dropout: one matmul with (W + Σ ΔW) ⊙ M instead of the base layer's and the deltas'
        with torch.no_grad():
            base.weight.mul_(mask)  # what the mask's pre-hook does: the stored W stays zero where masked
        weight = base.weight
        for adapter in active:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            if self.fan_in_fan_out or a.dtype != weight.dtype:
                weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
            else:  # W + scaling * B @ A in one pass
                weight = torch.addmm(weight, b, a, alpha=self.scaling[adapter])
        weight = weight * mask if weight is base.weight else weight.mul_(mask)
        return F.linear(x, weight, base.bias)
    result = base(x, *args, **kwargs)
    dtype = result.dtype
    for adapter in active:
        xa = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
        delta = self.get_delta_weight(adapter)
        result = result + F.linear(self.lora_dropout[adapter](xa), delta.to(xa.dtype))
        if lora_bias.get(adapter):
            result = result + self.lora_B[adapter].bias * self.scaling[adapter]
    return result.to(dtype)


_PATCHES = {"get_delta_weight": _masked_delta_weight, "forward": _masked_lora_forward}
