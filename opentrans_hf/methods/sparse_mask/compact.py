"""Compaction: physically remove the attention heads and MLP neurons that a sparse mask prunes entirely.

:meth:`SparseMask.compact` applies the mask, then, in every encoder layer of the CLIP vision tower,

* removes a head whose ``out_proj`` columns are all pruned: nothing of it reaches the output, whatever
  its q/k/v biases (so the biases of a removed head need no mask: they go with its rows);
* removes a head whose ``v_proj`` rows are all pruned: its values are the constant ``v`` bias at every
  token, so its output is that constant whatever the attention pattern, and ``out_proj`` columns x that
  bias is folded into ``out_proj``'s bias;
* removes a neuron whose ``fc2`` column is all pruned (nothing of it reaches the output, whatever its
  fc1 bias), or whose ``fc1`` row is all pruned (a constant ``act(fc1 bias)``, folded into fc2's bias).

The slices are exact: the compacted model computes what the masked dense model computes (up to float
rounding of the shorter sums). An attention left with no head becomes :class:`RemovedAttention` (its
output is ``out_proj``'s bias at every token), an MLP with no neuron :class:`RemovedMLP`; the default
``max_layer_sparsity`` of the structured scopes keeps one of each. The kept units (indices into the
original layer) are recorded in the host's ``config.compact_structure``; an OVS framework rebuilds
those shapes in ``__init__`` (:func:`shrink_to_structure`), so ``save_pretrained``/``from_pretrained``
round-trip a compacted framework.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from opentrans_hf.methods.sparse_mask.counting import vision_tower
from opentrans_hf.methods.sparse_mask.layer import _BUFFER, _HOOK_ATTR, remove_hooks
from opentrans_hf.methods.sparse_mask.structured import check_structure
from opentrans_hf.utils.naming import canonical_name, encoder_block_regex

_BLOCK = re.compile(r"(?:.*\.)?" + encoder_block_regex())


class _Bias(nn.Module):
    """Holds the bias of a removed module under its old name (``...out_proj.bias``, ``...fc2.bias``)."""

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


class RemovedAttention(nn.Module):
    """A CLIP attention module whose heads were all removed: every token gets ``out_proj``'s bias."""

    num_heads = 0

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        self.out_proj = _Bias(bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        b = self.out_proj.bias
        out = torch.zeros_like(hidden_states)  # a new tensor, not a view of the bias (FLOP counters trace it)
        return (out if b is None else out + b.to(hidden_states.dtype)), None


class RemovedMLP(nn.Module):
    """A CLIP MLP whose neurons were all removed: every token gets ``fc2``'s bias."""

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        self.fc2 = _Bias(bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b = self.fc2.bias
        out = torch.zeros_like(hidden_states)  # a new tensor, not a view of the bias (FLOP counters trace it)
        return out if b is None else out + b.to(hidden_states.dtype)


def encoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{canonical prefix ("encoder.layers.3"): encoder layer}`` of ``model``'s CLIP vision tower."""
    tower = vision_tower(model)
    blocks = {canonical_name(n): m for n, m in tower.named_modules() if _BLOCK.fullmatch(n)}
    if not blocks:
        raise ValueError(f"{type(model).__name__} holds no CLIP vision encoder layers (encoder.layers.N) to compact")
    return blocks


def _is_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj")) \
        and isinstance(getattr(module, "head_dim", None), int)


def _is_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in ("fc1", "fc2"))


def _dead(linear: nn.Linear, count: int, rows: bool) -> torch.Tensor:
    """Units (row or column groups of ``count``) whose weights the applied mask prunes entirely."""
    m = getattr(linear, _BUFFER.format("weight"), None)
    if m is None:
        return torch.zeros(count, dtype=torch.bool)
    m = m.cpu()
    alive = m.reshape(count, -1).any(1) if rows else m.reshape(m.shape[0], count, -1).any(2).any(0)
    return ~alive


def _unit_index(kept: list[int], size: int, device) -> torch.Tensor:
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=device)
    return (torch.tensor(kept, device=device)[:, None] * size + torch.arange(size, device=device)).reshape(-1)


def _slice(linear: nn.Linear, index: torch.Tensor, rows: bool) -> None:
    """Keep the rows (outputs, with the bias) or the columns (inputs) ``index`` of ``linear``, in place;
    an applied mask's buffers are sliced along."""
    dim = 0 if rows else 1
    index = index.to(linear.weight.device)
    with torch.no_grad():
        w = linear.weight
        linear.weight = nn.Parameter(w.detach().index_select(dim, index).clone(), requires_grad=w.requires_grad)
        if rows and linear.bias is not None:
            b = linear.bias
            linear.bias = nn.Parameter(b.detach().index_select(0, index).clone(), requires_grad=b.requires_grad)
        for pname in list(linear.__dict__.get(_HOOK_ATTR) or {}):
            key = _BUFFER.format(pname)
            for k in (key, key + "_pruned"):
                buf = getattr(linear, k, None)
                if buf is None or (pname == "bias" and not rows):
                    continue
                linear.register_buffer(k, buf.index_select(dim if pname == "weight" else 0, index.to(buf.device)),
                                       persistent=False)
    if rows:
        linear.out_features = linear.weight.shape[0]
    else:
        linear.in_features = linear.weight.shape[1]


def shrink_attention(layer: nn.Module, kept: list[int]) -> None:
    """Keep the heads ``kept`` of ``layer.self_attn`` (an attention with no head left becomes
    :class:`RemovedAttention`)."""
    attn = layer.self_attn
    if not kept:
        layer.self_attn = RemovedAttention(attn.out_proj.bias)
        return
    index = _unit_index(kept, attn.head_dim, attn.q_proj.weight.device)
    for p in ("q_proj", "k_proj", "v_proj"):
        _slice(getattr(attn, p), index, rows=True)
    _slice(attn.out_proj, index, rows=False)
    attn.num_heads = len(kept)


def shrink_mlp(layer: nn.Module, kept: list[int]) -> None:
    """Keep the neurons ``kept`` of ``layer.mlp`` (an MLP with none left becomes :class:`RemovedMLP`)."""
    mlp = layer.mlp
    if not kept:
        layer.mlp = RemovedMLP(mlp.fc2.bias)
        return
    index = _unit_index(kept, 1, mlp.fc1.weight.device)
    _slice(mlp.fc1, index, rows=True)
    _slice(mlp.fc2, index, rows=False)


def _removable_heads(attn: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(heads, removed, folded): heads whose out_proj columns are pruned, or whose v rows are (folded)."""
    count = attn.q_proj.out_features // attn.head_dim
    dead_out = _dead(attn.out_proj, count, rows=False)
    fold = _dead(attn.v_proj, count, rows=True) & ~dead_out
    if attn.out_proj.bias is None and attn.v_proj.bias is not None:
        fold[:] = False  # nowhere to fold the constant into
    return count, dead_out | fold, fold


def _removable_neurons(mlp: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    count = mlp.fc1.out_features
    dead_out = _dead(mlp.fc2, count, rows=False)
    fold = _dead(mlp.fc1, count, rows=True) & ~dead_out
    if mlp.fc2.bias is None:
        fold[:] = False
    return count, dead_out | fold, fold


@torch.no_grad()
def _fold_heads(attn: nn.Module, fold: torch.Tensor) -> None:
    """out_proj.bias += out_proj[:, head] @ v_bias[head] for the heads whose values are constant."""
    if attn.v_proj.bias is None or not fold.any():
        return
    index = _unit_index(fold.nonzero().flatten().tolist(), attn.head_dim, attn.out_proj.weight.device)
    w = attn.out_proj.weight.index_select(1, index).double()
    attn.out_proj.bias += (w @ attn.v_proj.bias.index_select(0, index).double()).to(attn.out_proj.bias.dtype)


@torch.no_grad()
def _fold_neurons(mlp: nn.Module, fold: torch.Tensor) -> None:
    """fc2.bias += fc2[:, i] * act(fc1.bias[i]) for the neurons whose input weights are all pruned."""
    if not fold.any():
        return
    index = fold.nonzero().flatten().to(mlp.fc2.weight.device)
    b1 = mlp.fc1.bias.index_select(0, index) if mlp.fc1.bias is not None else mlp.fc1.weight.new_zeros(len(index))
    act = getattr(mlp, "activation_fn", None) or (lambda x: x)
    mlp.fc2.bias += (mlp.fc2.weight.index_select(1, index).double() @ act(b1.float()).double()).to(mlp.fc2.bias.dtype)


def _compose(old: dict | None, kept: list[int], count: int, units: str, total: str) -> dict:
    """The kept units as indices of the original layer (``old``: an earlier compaction's entry)."""
    if old and units in old:
        return {units: [old[units][j] for j in kept], total: old[total]}
    return {units: kept, total: count}


def compact_model(mask, model: nn.Module, strict: bool = True, bake: bool = True) -> nn.Module:
    """:meth:`SparseMask.compact`: apply ``mask`` to ``model``, fold and slice away the heads and neurons
    it prunes entirely (see the module docstring), in place; returns ``model``.

    ``bake=True`` (default) takes the mask off the layers it touches: the model runs without hooks, its
    remaining pruned weights stay zero as plain weights. ``bake=False`` keeps the mask applied, sliced to
    the new shapes (``SparseMask.from_model`` then gives the compacted mask), e.g. to fine-tune on with
    the unstructured remainder fixed. The kept units, as indices of the original layers, go to
    ``model.config.compact_structure`` (composed with an earlier compaction's)."""
    blocks = encoder_blocks(model)
    found, _ = mask.resolve(model, strict=strict)
    mask.apply(model, strict=strict)
    cfg = getattr(model, "config", None)
    previous = dict(getattr(cfg, "compact_structure", None) or {})
    record = {}
    for prefix, layer in blocks.items():
        entry = {}
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and _is_attention(attn):
            count, removed, fold = _removable_heads(attn)
            if removed.any():
                _fold_heads(attn, fold)
                for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    if bake:
                        remove_hooks(getattr(attn, p))
                kept = (~removed).nonzero().flatten().tolist()
                shrink_attention(layer, kept)
                entry.update(_compose(previous.get(prefix), kept, count, "heads", "num_heads"))
        if mlp is not None and _is_mlp(mlp):
            count, removed, fold = _removable_neurons(mlp)
            if removed.any():
                _fold_neurons(mlp, fold)
                for p in ("fc1", "fc2"):
                    if bake:
                        remove_hooks(getattr(mlp, p))
                kept = (~removed).nonzero().flatten().tolist()
                shrink_mlp(layer, kept)
                entry.update(_compose(previous.get(prefix), kept, count, "neurons", "intermediate_size"))
        if entry:
            record[prefix] = {**previous.get(prefix, {}), **entry}
    if bake:
        modules = dict(model.named_modules())
        for target in found.values():
            module = modules.get(target.rpartition(".")[0])
            if module is not None:
                remove_hooks(module)
    structure = {p: record.get(p, previous.get(p)) for p in blocks if p in record or p in previous}
    if structure and cfg is not None and hasattr(cfg, "to_dict"):
        cfg.compact_structure = check_structure(structure, "compact_structure")
    return model


def shrink_to_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Give ``model``'s vision tower the shapes of a compacted one: keep the heads and neurons of
    ``structure`` (``config.compact_structure`` of a compacted model), so that its weights load. Called by
    the OVS frameworks' ``__init__``; for a compacted ``CLIPVisionModel``/``CLIPModel``, build the model
    from its config, call this, then ``load_state_dict``. Errors name the layer."""
    check_structure(structure, "compact_structure")
    blocks = encoder_blocks(model)
    for prefix, entry in structure.items():
        layer = blocks.get(prefix)
        if layer is None:
            raise ValueError(f"compact_structure names {prefix!r}, which is not an encoder layer of "
                             f"{type(model).__name__} ({len(blocks)} layers)")
        if "heads" in entry:
            attn = layer.self_attn
            count = attn.q_proj.out_features // attn.head_dim if _is_attention(attn) else None
            if count != entry["num_heads"]:
                raise ValueError(f"compact_structure[{prefix!r}] has num_heads={entry['num_heads']} but the layer "
                                 f"has {count} heads")
            shrink_attention(layer, entry["heads"])
        if "neurons" in entry:
            mlp = layer.mlp
            count = mlp.fc1.out_features if _is_mlp(mlp) else None
            if count != entry["intermediate_size"]:
                raise ValueError(f"compact_structure[{prefix!r}] has intermediate_size={entry['intermediate_size']} "
                                 f"but the layer has {count} neurons")
            shrink_mlp(layer, entry["neurons"])
    return model
