"""Magnitude pruning criteria: global (the paper), layer-wise, AlphaPruning's alpha allocation, the
paper's ``Random(...)`` baseline (a seeded random mask of the same size), and structured pruning of
whole attention heads and MLP neurons (:mod:`.structured`)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from opentrans_hf.methods.sparse_mask.layer import CLIP_ENCODER_TARGETS, current_mask, prunable_layers  # noqa: F401
from opentrans_hf.methods.sparse_mask.mask import SparseMask
from opentrans_hf.methods.sparse_mask.semistructured import two_four_masks
from opentrans_hf.methods.sparse_mask.structured import select_units, structure_record, unit_groups
from opentrans_hf.spectral import analyze_spectra
from opentrans_hf.utils.matching import Patterns
from opentrans_hf.utils.naming import canonical_name

SCOPES = ("global", "layerwise", "alpha", "random", "2:4", "structured", "structured-layerwise")
STRUCTURED_SCOPES = ("structured", "structured-layerwise")
DEFAULT_MAX_LAYER_SPARSITY = 0.99
"""The global scopes' default cap on one layer's sparsity: no layer is pruned away entirely."""


def two_four_prune(model: nn.Module, sparsity: float | None = 0.5, target_modules: Patterns = None,
                   exclude_modules: Patterns = None) -> SparseMask:
    """``magnitude_prune(model, 0.5, scope="2:4")``: the 2:4 mask of every target Linear layer (default
    targets: :func:`~opentrans_hf.methods.sparse_mask.magnitude.prunable_layers`). The sparsity is 0.5 by
    construction: ``sparsity`` must be 0.5 or None."""
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)
                                     and abs(sparsity - 0.5) < 1e-12):
        raise ValueError(f"scope='2:4' prunes exactly half of the weights (2 of every 4): sparsity must be 0.5 or "
                         f"None, got {sparsity!r}")
    layers = prunable_layers(model, target_modules, exclude_modules)
    keep = two_four_masks(layers)
    masks = {canonical_name(f"{n}.weight"): k for (n, _), k in zip(layers, keep)}
    return SparseMask(masks, base_model_name_or_path=getattr(model, "name_or_path", None) or None,
                      method="magnitude-2:4", target_sparsity=0.5, extra={"pattern": "2:4"})


def magnitude_prune(model: nn.Module, sparsity: float | None, scope: str = "global", target_modules: Patterns = None,
                    exclude_modules: Patterns = None, alphas: dict[str, float] | None = None,
                    epsilon: float = 0.3, like: SparseMask | None = None, seed: int = 0,
                    max_layer_sparsity: float = DEFAULT_MAX_LAYER_SPARSITY) -> SparseMask:
    """L1-magnitude masks reaching ``sparsity`` (fraction of the target weights pruned, overall).

    * ``"global"``: one threshold over all target weights, as the paper: the ``round(sparsity * N)``
      smallest magnitudes go, chosen exactly as ``torch.nn.utils.prune.global_unstructured(...,
      L1Unstructured, amount=sparsity)`` chooses them (``torch.topk`` over the concatenation).
    * ``"layerwise"``: the same sparsity in every layer.
    * ``"alpha"``: AlphaPruning's allocation: per-layer sparsity linear in the layer's alpha within
      ``[s(1-eps), s(1+eps)]`` and rescaled so that the global sparsity is met (higher alpha, more
      pruned); ``alphas`` by module name, or measured with ``analyze_spectra``.
    * ``"random"``: the paper's ``Random(...)`` baseline, drawn by ``seed`` (a CPU generator: the same
      seed gives the same mask on every machine and process). Without ``like`` (method
      ``"random-global"``): exactly as many target weights pruned as ``"global"`` prunes,
      ``round(sparsity * N)``, chosen uniformly over all target weights (``global_unstructured`` with
      ``RandomUnstructured``). With ``like=<SparseMask>`` (method ``"random-like"``): the layers of
      ``like``, each with exactly as many weights pruned as ``like`` prunes there (per layer what
      ``random_unstructured`` draws at that layer's sparsity); ``sparsity`` may then be None, or must
      agree with ``like``'s, and ``target_modules``/``exclude_modules`` are not given. The seed (and
      ``like``'s method) are recorded in the mask's ``extra``.
    * ``"structured"``: whole attention heads and MLP neurons of the encoder blocks (see
      :mod:`opentrans_hf.methods.sparse_mask.structured`), ranked globally by importance = the L1 norm of the unit's
      weights / their number (a head: its q/k/v weight rows and out_proj weight columns, ``4 x head_dim
      x hidden`` weights; a neuron: its fc1 row and fc2 column, ``2 x hidden``; biases not counted),
      least important first, until ``round(sparsity * N)`` target weights are pruned (the last unit may
      overshoot by less than its size). ``"structured-layerwise"``: every attention module loses
      ``round(sparsity * heads)`` heads and every MLP ``round(sparsity * neurons)`` neurons. The result
      is an ordinary mask (the units' weights masked; biases stay, see :meth:`SparseMask.compact`) that
      also records the kept units in ``extra["structure"]``.

    ``max_layer_sparsity`` (default 0.99) keeps global pruning from removing a layer entirely (layer
    collapse: global magnitude pruning of a randomly initialised CLIP removes all of q/k/v/fc2, whose
    initial weights are smaller): ``"global"`` prunes at most ``floor(cap * n)`` of a layer's ``n``
    weights and takes the rest of the target from the other layers; the structured scopes remove at
    most ``floor(cap * count)`` of a module's heads / neurons, so any cap below 1 keeps at least one.
    A binding cap warns, naming the layers; ``1.0`` disables it. When it does not bind, ``"global"``
    is exactly ``global_unstructured``. The other scopes ignore it.

    Weights already masked (a SparseMask applied to ``model``) stay pruned and count towards
    ``sparsity``: pruning a masked model prunes among the survivors. The model is not changed.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    check_max_layer_sparsity(max_layer_sparsity)
    if like is not None and scope != "random":
        raise ValueError(f"like= (a mask whose per-layer sparsities to match) needs scope='random', got scope={scope!r}")
    if scope == "2:4":  # 2 largest of every 4 consecutive weights per row (semistructured.py); sparsity 0.5
        return two_four_prune(model, sparsity, target_modules, exclude_modules)
    layers, like_pruned, sparsity = _target_layers(model, sparsity, like, target_modules, exclude_modules)
    if scope in STRUCTURED_SCOPES:
        return _structured_prune(model, layers, sparsity, scope, max_layer_sparsity)
    if scope == "random" and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    scores, current = _layer_scores(layers, torch.Generator().manual_seed(seed) if scope == "random" else None)
    if scope == "global":  # called from here: the cap's warning names magnitude_prune's caller
        keep = _global_keep(scores, sparsity, [n for n, _ in layers], max_layer_sparsity)
    elif scope == "random" and like is None:
        keep = _global_keep(scores, sparsity)
    elif like is not None:
        keep = [_keep_k_smallest_pruned(s, k) for s, k in zip(scores, like_pruned)]
    else:
        ratios = [sparsity] * len(layers) if scope == "layerwise" else alpha_allocation(model, layers, sparsity, alphas, epsilon)
        keep = [_keep_smallest_pruned(s, r) for s, r in zip(scores, ratios)]
    keep = [k if c is None else k & c for k, c in zip(keep, current)]  # what was pruned stays pruned
    masks = {canonical_name(f"{n}.weight"): k for (n, _), k in zip(layers, keep)}
    method, extra = _method_and_extra(scope, like, seed, epsilon, max_layer_sparsity)
    return SparseMask(masks, base_model_name_or_path=getattr(model, "name_or_path", None) or None,
                      method=method, target_sparsity=sparsity, extra=extra)


def check_max_layer_sparsity(value, name: str = "max_layer_sparsity", error: type[Exception] = ValueError) -> None:
    """``value`` is a number in (0, 1] (not a bool), else ``error`` naming ``name``: the one check of the
    cap on one layer's sparsity (:func:`magnitude_prune`, ``IMPConfig``, the prune job's arguments)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise error(f"{name} must be in (0, 1], got {value!r}")


def _target_layers(model: nn.Module, sparsity: float | None, like: SparseMask | None, target_modules,
                   exclude_modules) -> tuple[list, list[int] | None, float]:
    """The layers to prune, how many weights ``like`` prunes in each (None without ``like``), and the
    sparsity (``like``'s when not given)."""
    if like is not None:
        layers, like_pruned = _layers_like(model, like, target_modules, exclude_modules)
        return layers, like_pruned, _check_like_sparsity(sparsity, like, layers)
    if sparsity is None or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return prunable_layers(model, target_modules, exclude_modules), None, sparsity


def _layer_scores(layers, generator: torch.Generator | None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per layer: the ranking scores (L1 magnitudes, or uniform draws from ``generator``; weights already
    masked score -1, below every survivor) and the mask already applied (None if none)."""
    scores, current = [], []
    for _, m in layers:
        if generator is not None:  # uniform scores: the smallest k are a uniform draw of k weights
            s = torch.rand(m.weight.shape, generator=generator)
        else:
            s = m.weight.detach().abs().float().cpu()
        cur = current_mask(m)
        if cur is not None:  # already pruned: always below every survivor
            cur = cur.cpu()
            s = torch.where(cur, s, torch.full_like(s, -1.0))
        scores.append(s)
        current.append(cur)
    return scores, current


def _method_and_extra(scope: str, like: SparseMask | None, seed: int, epsilon: float,
                      max_layer_sparsity: float) -> tuple[str, dict | None]:
    """The mask's ``method`` and ``extra`` for an unstructured scope."""
    if scope == "random":
        method = "random-like" if like is not None else "random-global"
        return method, {"seed": seed, **({"like_method": like.method, "like_base_model": like.base_model_name_or_path}
                                         if like is not None else {})}
    if scope == "global":
        return f"magnitude-{scope}", {"max_layer_sparsity": max_layer_sparsity}
    return f"magnitude-{scope}", {"epsilon": epsilon} if scope == "alpha" else None


def _layers_like(model: nn.Module, like: SparseMask, target_modules, exclude_modules):
    """(name, module) of ``model``'s layers that ``like`` masks, and how many weights ``like`` prunes in each."""
    if not isinstance(like, SparseMask):
        raise TypeError(f"like must be a SparseMask, got {type(like).__name__}")
    if target_modules is not None or exclude_modules is not None:
        raise ValueError("like= decides which layers are pruned: give no target_modules / exclude_modules with it")
    try:
        found, _ = like.resolve(model, strict=True)
    except KeyError as err:  # a missing layer: named in the message
        raise ValueError(f"like=: {err.args[0]}") from None
    except ValueError as err:  # a shape mismatch: named in the message
        raise ValueError(f"like=: {err}") from None
    modules = dict(model.named_modules())
    layers, pruned = [], []
    for name, target in found.items():
        mod_name, _, pname = target.rpartition(".")
        module = modules[mod_name]
        if pname != "weight" or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"like= masks {name!r}, which is not the weight of a Linear/Conv layer of "
                             f"{type(model).__name__} ({target!r})")
        layers.append((mod_name, module))
        pruned.append(int((~like.masks[name]).sum()))
    return layers, pruned


def _check_like_sparsity(sparsity: float | None, like: SparseMask, layers) -> float:
    """``like``'s overall sparsity; a given ``sparsity`` must agree with it (up to rounding)."""
    actual = like.sparsity
    if sparsity is None:
        return actual
    tolerance = max(1e-3, len(layers) / max(like.num_weights, 1))
    if not (isinstance(sparsity, (int, float)) and abs(sparsity - actual) <= tolerance):
        raise ValueError(f"sparsity={sparsity!r} disagrees with like='s mask (its sparsity is {actual:.4f}): with "
                         f"like= the per-layer sparsities are its own; pass sparsity=None or {actual:.4f}")
    return float(sparsity)


def _structured_prune(model: nn.Module, layers, sparsity: float, scope: str, max_layer_sparsity: float) -> SparseMask:
    groups = unit_groups(model, layers)
    keep, capped = select_units(groups, sparsity, current_mask, layerwise=scope == "structured-layerwise",
                                max_layer_sparsity=max_layer_sparsity)
    if capped:
        _warn_capped(capped, max_layer_sparsity)
    by_layer = {}
    for g, k in zip(groups, keep):
        for part, (name, module, _) in g.layers.items():
            m = g.expand(part, k)
            cur = current_mask(module)
            by_layer[name] = m if cur is None else m & cur.cpu()  # what was pruned stays pruned
    masks = {canonical_name(f"{n}.weight"): by_layer[n] for n, _ in layers}
    extra = {"structure": structure_record(groups, keep), "max_layer_sparsity": max_layer_sparsity,
             "importance": "L1 of the unit's weights / their number (q/k/v rows + out_proj columns; fc1 row + fc2 column)"}
    return SparseMask(masks, base_model_name_or_path=getattr(model, "name_or_path", None) or None,
                      method=f"magnitude-{scope}", target_sparsity=sparsity, extra=extra)


def _warn_capped(names: list[str], cap: float) -> None:
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    warnings.warn(f"max_layer_sparsity={cap} bound: {len(names)} layer(s) pruned only up to the cap ({shown}); "
                  f"the rest of the target sparsity was taken from the other layers (max_layer_sparsity=1.0 "
                  f"lets a layer be pruned entirely)", stacklevel=4)


def _global_keep(scores: list[torch.Tensor], sparsity: float, names: list[str] | None = None,
                 max_layer_sparsity: float = 1.0) -> list[torch.Tensor]:
    """The global ``round(sparsity * N)`` smallest scores pruned; with a cap below 1, a layer holding more
    than ``floor(cap * n)`` of them is pruned to exactly that (its smallest; never fewer than it already
    had pruned) and the remainder is chosen globally among the other layers, until no layer exceeds."""
    total = sum(s.numel() for s in scores)
    k = round(sparsity * total)  # torch.nn.utils.prune._compute_nparams_toprune
    keep = _global_keep_k(scores, k)
    if max_layer_sparsity >= 1.0:
        return keep
    limits = [max(math.floor(max_layer_sparsity * s.numel() + 1e-9), int((s < 0).sum())) for s in scores]
    over = [i for i, kp in enumerate(keep) if int((~kp).sum()) > limits[i]]
    if not over:
        return keep  # exactly global_unstructured
    capped: set[int] = set()
    while over:
        capped |= set(over)
        free = [i for i in range(len(scores)) if i not in capped]
        budget = k - sum(limits[i] for i in capped)
        room = sum(scores[i].numel() for i in free)
        if budget > room:
            raise ValueError(f"sparsity {sparsity} cannot be reached with max_layer_sparsity={max_layer_sparsity}; "
                             f"raise the cap or lower the sparsity")
        for i, kp in zip(free, _global_keep_k([scores[i] for i in free], max(budget, 0))):
            keep[i] = kp
        over = [i for i in free if int((~keep[i]).sum()) > limits[i]]
    for i in capped:
        keep[i] = _keep_k_smallest_pruned(scores[i], limits[i])
    _warn_capped([canonical_name(f"{names[i]}.weight") if names else str(i) for i in sorted(capped)], max_layer_sparsity)
    return keep


def _global_keep_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k=k, largest=False).indices] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def _keep_smallest_pruned(score: torch.Tensor, ratio: float) -> torch.Tensor:
    return _keep_k_smallest_pruned(score, round(min(max(ratio, 0.0), 1.0) * score.numel()))


def _keep_k_smallest_pruned(score: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(score.reshape(-1), k=k, largest=False).indices] = False
    return keep.reshape(score.shape)


def alpha_allocation(model, layers, sparsity: float, alphas: dict[str, float] | None, epsilon: float) -> list[float]:
    """AlphaPruning (Lu et al. 2024): per-layer sparsities from the layers' alphas."""
    if alphas is None:
        report = analyze_spectra(model, target_modules=[n for n, _ in layers])
        alphas = {}
        for layer, a in report.alphas.items():  # fused q/k/v parts -> mean per module
            mod = layer if layer in dict(layers) else layer.rsplit("_", 1)[0]
            alphas.setdefault(mod, []).append(a)
        alphas = {k: sum(v) / len(v) for k, v in alphas.items()}
    missing = [n for n, _ in layers if n not in alphas]
    if missing:
        raise ValueError(f"no alpha for layer(s) {missing[:3]} (alpha allocation needs one per pruned layer)")
    a = torch.tensor([float(alphas[n]) for n, _ in layers], dtype=torch.float64)
    sizes = torch.tensor([m.weight.numel() for _, m in layers], dtype=torch.float64)
    lo, hi = 1.0 - epsilon, 1.0 + epsilon
    scores = torch.full_like(a, 1.0) if float(a.max() - a.min()) == 0 else (a - a.min()) * (hi - lo) / (a.max() - a.min()) + lo
    ratios = scores * sparsity
    ratios = ratios * (sizes.sum() * sparsity) / (sizes * ratios).sum()
    return ratios.clamp(0.0, 1.0).tolist()
