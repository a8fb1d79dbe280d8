"""Structured pruning of the CLIP image encoder: whole attention heads and MLP neurons.

A unit is one attention head (its ``head_dim`` rows of ``q_proj``, ``k_proj`` and ``v_proj`` and its
``head_dim`` columns of ``out_proj``: ``4 x head_dim x hidden`` weights) or one MLP neuron (its row
of ``fc1`` and its column of ``fc2``: ``2 x hidden`` weights). Its importance is the L1 norm of those
weights divided by their number (the unit's mean ``|w|``; biases are not counted), so that a head and a
neuron, whose sizes differ by a factor ``2 x head_dim``, compete fairly in one global ranking. Weights
already masked count as zero; a unit whose weights are all masked stays removed.

Sparsity is counted in weights of the target layers, as for unstructured masks: removing a head prunes
``4 x head_dim x hidden`` weights, a neuron ``2 x hidden``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from opentrans_hf.utils.io import is_integer
from opentrans_hf.utils.naming import canonical_name

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The Linear layers of a CLIP attention module: a head is rows of the first three, columns of the last."""
MLP_PARTS = ("fc1", "fc2")
"""The Linear layers of a CLIP MLP: a neuron is a row of ``fc1`` and a column of ``fc2``."""
UNIT_FIELDS = (("heads", "num_heads"), ("neurons", "intermediate_size"))
"""The fields of a structure entry: kept unit indices and how many units the layer had."""


@dataclass
class UnitGroup:
    """The heads of one attention module or the neurons of one MLP, among the target layers."""

    kind: str  # "heads" or "neurons"
    block: str  # canonical prefix of the encoder layer, e.g. "encoder.layers.3"
    layers: dict[str, tuple[str, nn.Module, bool]]  # part -> (model's layer name, module, units are rows)
    count: int  # number of units
    unit_size: int  # weights per unit

    def unit_view(self, part: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (a tensor shaped like ``part``'s weight) as ``(count, weights of one unit in part)``."""
        _, _, rows = self.layers[part]
        if rows:
            return w.reshape(self.count, -1)
        return w.reshape(w.shape[0], self.count, -1).transpose(0, 1).reshape(self.count, -1)

    def expand(self, part: str, keep: torch.Tensor) -> torch.Tensor:
        """A unit keep-vector ``(count,)`` as a weight mask of ``part``."""
        _, module, rows = self.layers[part]
        shape = module.weight.shape
        if rows:
            return keep.repeat_interleave(shape[0] // self.count)[:, None].expand(shape).clone()
        return keep.repeat_interleave(shape[1] // self.count)[None, :].expand(shape).clone()


def unit_groups(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[UnitGroup]:
    """Group the target ``layers`` of ``model`` into attention heads and MLP neurons.

    Every target layer must be a ``q_proj``/``k_proj``/``v_proj``/``out_proj`` of an attention module
    (with ``head_dim``) or an ``fc1``/``fc2`` of an MLP, and each such module is targeted whole (all four,
    or both): structured pruning removes whole units. Errors name the layer."""
    modules = dict(model.named_modules())
    parents: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in layers:
        parent, _, part = name.rpartition(".")
        if part not in ATTENTION_PARTS + MLP_PARTS or not isinstance(module, nn.Linear):
            raise ValueError(f"structured pruning removes attention heads (q_proj/k_proj/v_proj/out_proj) and MLP "
                             f"neurons (fc1/fc2) of the CLIP image encoder; target layer {name!r} is neither "
                             f"(choose target_modules among those layers, or an unstructured scope)")
        parents.setdefault(parent, {})[part] = (name, module)
    groups = []
    for parent, parts in parents.items():
        wanted = ATTENTION_PARTS if set(parts) & set(ATTENTION_PARTS) else MLP_PARTS
        missing = [p for p in wanted if p not in parts]
        if missing:
            raise ValueError(f"structured pruning removes whole units: {parent!r} is targeted without {missing} "
                             f"(target all of {list(wanted)} of a module, or none)")
        block = canonical_name(parent.rpartition(".")[0])
        if wanted == ATTENTION_PARTS:
            attn = modules[parent]
            q, o = parts["q_proj"][1], parts["out_proj"][1]
            head_dim = getattr(attn, "head_dim", None)
            if not is_integer(head_dim) or head_dim < 1 or q.out_features % head_dim:
                raise ValueError(f"{parent!r}: an attention module with a head_dim that divides q_proj's "
                                 f"{q.out_features} outputs is needed for structured pruning, got head_dim={head_dim!r}")
            count = q.out_features // head_dim
            for p in ("k_proj", "v_proj"):
                if parts[p][1].out_features != q.out_features:
                    raise ValueError(f"{parts[p][0]!r} has {parts[p][1].out_features} outputs, q_proj {q.out_features}")
            if o.in_features != q.out_features:
                raise ValueError(f"{parts['out_proj'][0]!r} has {o.in_features} inputs, q_proj {q.out_features} outputs")
            size = head_dim * (sum(parts[p][1].in_features for p in ATTENTION_PARTS[:3]) + o.out_features)
            layers_ = {p: (*parts[p], p != "out_proj") for p in ATTENTION_PARTS}
            groups.append(UnitGroup("heads", block, layers_, count, size))
        else:
            fc1, fc2 = parts["fc1"][1], parts["fc2"][1]
            if fc1.out_features != fc2.in_features:
                raise ValueError(f"{parent!r}: fc1 has {fc1.out_features} outputs but fc2 {fc2.in_features} inputs")
            layers_ = {p: (*parts[p], p == "fc1") for p in MLP_PARTS}
            groups.append(UnitGroup("neurons", block, layers_, fc1.out_features, fc1.in_features + fc2.out_features))
    return groups


def unit_scores(group: UnitGroup, current: Callable[[nn.Module], torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance, surviving weights) per unit: importance = L1 of the unit's unmasked weights / the
    unit's number of weights (float64); ``current(module)`` is the mask applied to a module, or None."""
    score = torch.zeros(group.count, dtype=torch.float64)
    alive = torch.zeros(group.count, dtype=torch.long)
    for part, (_, module, _) in group.layers.items():
        w = module.weight.detach().abs().double().cpu()
        m = current(module)
        if m is not None:
            m = m.cpu()
            w = w * m
            alive += group.unit_view(part, m).sum(1)
        else:
            alive += group.unit_view(part, w).shape[1]
        score += group.unit_view(part, w).sum(1)
    return score / group.unit_size, alive


def max_units_removed(count: int, max_layer_sparsity: float) -> int:
    """At most ``floor(max_layer_sparsity x count)`` units of a layer go: with a cap below 1, one is kept."""
    return min(count, math.floor(max_layer_sparsity * count + 1e-9))


def select_units(groups: list[UnitGroup], sparsity: float, current, layerwise: bool = False,
                 max_layer_sparsity: float = 1.0) -> tuple[list[torch.Tensor], list[str]]:
    """Which units each group keeps (bool ``(count,)``), and the groups the cap held back (their names).

    Global: units are ranked by importance over all groups and removed, least important first, until the
    pruned weights of the target layers reach ``round(sparsity x N)`` (the last unit may overshoot by
    less than its size). Layerwise: each group removes ``round(sparsity x count)`` units, its least
    important. Both: units already fully masked stay removed, and a group never loses more than
    :func:`max_units_removed` units (a unit the cap keeps is skipped; the others make up the count)."""
    scored = [unit_scores(g, current) for g in groups]
    removed = [alive == 0 for _, alive in scored]
    limits = [max(max_units_removed(g.count, max_layer_sparsity), int(r.sum())) for g, r in zip(groups, removed)]
    capped: set[int] = set()
    if layerwise:
        for i, (g, (score, _)) in enumerate(zip(groups, scored)):
            want = round(sparsity * g.count)
            if want > limits[i]:
                capped.add(i)
                want = limits[i]
            more = want - int(removed[i].sum())
            if more > 0:
                candidates = (~removed[i]).nonzero().flatten()
                order = torch.argsort(score[candidates], stable=True)
                removed[i][candidates[order[:more]]] = True
    else:
        total = sum(g.count * g.unit_size for g in groups)
        target = round(sparsity * total)
        pruned = total - sum(int(alive.sum()) for _, alive in scored)
        n_removed = [int(r.sum()) for r in removed]
        scores = torch.cat([s for s, _ in scored])
        owner = torch.cat([torch.full((g.count,), i, dtype=torch.long) for i, g in enumerate(groups)]).tolist()
        index = torch.cat([torch.arange(g.count) for g in groups]).tolist()
        for j in torch.argsort(scores, stable=True).tolist():  # ties: in layer order
            if pruned >= target:
                break
            gi, ui = owner[j], index[j]
            if removed[gi][ui]:
                continue
            if n_removed[gi] >= limits[gi]:
                capped.add(gi)
                continue
            removed[gi][ui] = True
            n_removed[gi] += 1
            pruned += int(scored[gi][1][ui])
        if pruned < target:
            raise ValueError(f"sparsity {sparsity} cannot be reached by removing whole heads and neurons with "
                             f"max_layer_sparsity={max_layer_sparsity} (at most {pruned / total:.4f}); raise the cap "
                             f"or lower the sparsity")
    names = [f"{groups[i].block} ({groups[i].kind})" for i in sorted(capped)]
    return [~r for r in removed], names


def structure_record(groups: list[UnitGroup], keep: list[torch.Tensor]) -> dict:
    """``{block: {"heads": [kept], "num_heads": H, "neurons": [kept], "intermediate_size": I}}`` (the
    fields of the groups present)."""
    out: dict[str, dict] = {}
    for g, k in zip(groups, keep):
        entry = out.setdefault(g.block, {})
        entry[g.kind] = k.nonzero().flatten().tolist()
        entry[dict(UNIT_FIELDS)[g.kind]] = g.count
    return out


def check_structure(structure, where: str = "structure") -> dict:
    """Check a structure record (``SparseMask.extra["structure"]``, a framework's ``compact_structure``):
    ``{layer prefix: {"heads": [...], "num_heads": H, "neurons": [...], "intermediate_size": I}}``, each
    pair optional but not both absent, indices integers in range, sorted and unique. Errors name the
    field and the value. Returns it."""
    if not isinstance(structure, dict):
        raise ValueError(f"{where} must be an object of layer prefix -> kept units, got {structure!r} "
                         f"({type(structure).__name__})")
    known = {f for pair in UNIT_FIELDS for f in pair}
    for prefix, entry in structure.items():
        at = f"{where}[{prefix!r}]"
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"{where}: layer prefixes must be non-empty strings, got {prefix!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"{at} must be an object with 'heads'/'num_heads' and/or 'neurons'/'intermediate_size', "
                             f"got {entry!r}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{at}: unknown field(s) {unknown}; an entry has {sorted(known)}")
        if not any(units in entry or total in entry for units, total in UNIT_FIELDS):
            raise ValueError(f"{at} is empty: give 'heads' + 'num_heads' and/or 'neurons' + 'intermediate_size'")
        for units, total in UNIT_FIELDS:
            if (units in entry) != (total in entry):
                have, lack = (units, total) if units in entry else (total, units)
                raise ValueError(f"{at} has field {have!r} but not {lack!r}")
            if units not in entry:
                continue
            n, kept = entry[total], entry[units]
            if not (is_integer(n) and n >= 1):
                raise ValueError(f"{at} field {total!r} must be a positive integer, got {n!r}")
            if not (isinstance(kept, list) and all(is_integer(i) for i in kept)):
                raise ValueError(f"{at} field {units!r} must be a list of integers, got {kept!r}")
            bad = [i for i in kept if not 0 <= i < n]
            if bad:
                raise ValueError(f"{at} field {units!r}: indices {bad[:5]} out of range [0, {n}) ({total}={n})")
            if any(b <= a for a, b in zip(kept, kept[1:])):
                raise ValueError(f"{at} field {units!r} must be sorted and unique, got {kept}")
    return structure
