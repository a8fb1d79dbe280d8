"""``torch.utils.flop_counter`` with the CPU attention kernel counted too.

PyTorch's FlopCounterMode knows the CUDA scaled-dot-product-attention kernels but not the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``), so on CPU the attention matmuls would count as 0.
The same formulas are registered here for the CPU kernel and its backward.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

aten = torch.ops.aten


def _as_raw(fn):
    """``sdpa_flop`` / ``sdpa_backward_flop`` already take tensors (registered with shape wrapping):
    mark them raw so FlopCounterMode does not wrap them a second time."""

    def formula(*args, out_val=None, **kwargs):
        return fn(*args, out_val=out_val, **kwargs)

    formula._get_raw = True
    return formula


_CPU_SDPA = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CPU_SDPA[aten._scaled_dot_product_flash_attention_for_cpu] = _as_raw(sdpa_flop)
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _CPU_SDPA[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _as_raw(sdpa_backward_flop)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=dict(_CPU_SDPA))
