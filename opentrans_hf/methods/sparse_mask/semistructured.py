"""2:4 semi-structured sparsity: in every row of a Linear weight, each group of 4 consecutive weights
along the input dimension keeps exactly its 2 largest magnitudes (NVIDIA's sparse tensor cores,
``torch.sparse.to_sparse_semi_structured``). ``magnitude_prune(model, 0.5, scope="2:4")`` selects
with :func:`two_four_masks`; ``SparseMask.export(model, "2:4")`` converts the kept weights."""

from __future__ import annotations

import torch
from torch import nn

from opentrans_hf.methods.sparse_mask.layer import current_mask

GROUP, KEEP = 4, 2


def two_four_mask(score: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Bool mask of a 2-D ``score`` (out, in): in each row, of every 4 consecutive entries the 2 largest
    are kept (ties: the first). ``in`` must be divisible by 4 (else an error naming ``name``)."""
    if score.dim() != 2:
        raise ValueError(f"2:4 sparsity applies to 2-D Linear weights; {name} has shape {tuple(score.shape)}")
    rows, cols = score.shape
    if cols % GROUP:
        raise ValueError(f"2:4 sparsity needs in_features divisible by {GROUP}; {name} has {cols} (shape "
                         f"{tuple(score.shape)}): exclude it (exclude_modules=[...]) or use another scope")
    groups = score.reshape(rows, cols // GROUP, GROUP)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    # stable descending sort: equal scores keep the earlier weight, on every machine
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :KEEP]
    keep.scatter_(-1, order, True)
    return keep.reshape(rows, cols)


def two_four_masks(layers: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """:func:`two_four_mask` of each ``(name, Linear)``'s weight magnitudes. Weights already masked (a
    SparseMask applied) stay pruned: a group with more than 2 of them pruned keeps fewer than 2."""
    out = []
    for name, module in layers:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"2:4 sparsity applies to Linear layers; {name} is a {type(module).__name__}: "
                             "exclude it (exclude_modules=[...]) or use another scope")
        score = module.weight.detach().abs().float().cpu()
        current = current_mask(module)
        if current is not None:
            current = current.cpu()
            score = torch.where(current, score, torch.full_like(score, -1.0))
        keep = two_four_mask(score, f"{name}.weight")
        out.append(keep if current is None else keep & current)
    return out


def is_two_four(mask: torch.Tensor) -> bool:
    """True when the 2-D bool ``mask`` keeps at most 2 of every 4 consecutive entries of each row."""
    if mask.dim() != 2 or mask.shape[1] % GROUP:
        return False
    return bool((mask.reshape(mask.shape[0], -1, GROUP).sum(-1) <= KEEP).all())
