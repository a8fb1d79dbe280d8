"""Freeze rules: which analysed layers (or blocks) to freeze, from their alphas. Pure functions."""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Mapping

from opentrans_hf.utils.naming import resolve_name

_BLOCK = re.compile(r"^(.*?\b(?:layers|layer|blocks|block|resblocks|h)\.\d+)(?:\.|$)")
_RESNET = re.compile(r"^(.*?\blayer\d+\.\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """The transformer block / residual stage a layer belongs to: the prefix up to ``layers.N``,
    ``layer.N``, ``blocks.N``, ``resblocks.N``, ``h.N`` or ResNet's ``layerX.Y``; a layer outside any
    block (patch embedding, heads) is its own block."""
    m = _RESNET.match(name) or _BLOCK.match(name)
    return m.group(1) if m else name


def units_and_alphas(layer_alphas: Mapping[str, float], granularity: str) -> tuple[dict[str, float], dict[str, str]]:
    """(alpha per decision unit, unit of each layer). Blocks use the mean alpha of their layers."""
    if granularity == "layer":
        return dict(layer_alphas), {n: n for n in layer_alphas}
    unit_of = {n: block_of(n) for n in layer_alphas}
    members: dict[str, list[float]] = {}
    for n, a in layer_alphas.items():
        members.setdefault(unit_of[n], []).append(a)
    return {u: statistics.fmean(v) for u, v in members.items()}, unit_of


def frozen_units(alphas: Mapping[str, float], rule: str, *, freeze_ratio: float = 0.5,
                 alpha_threshold: float | None = None, k: int | None = None, seed: int = 0) -> set[str]:
    """The units to freeze under ``rule`` (see SpectralTuningConfig.freeze_rule).

    median: alpha < statistics.median (the paper; with an even count exactly the lower half when the
    alphas are distinct). ratio: the ``int(freeze_ratio * n)`` smallest. threshold: alpha < threshold.
    top_k: all but the ``k`` largest. Ties in the sorted rules keep ``named_modules()`` order.
    random: the paper's ``Random(...)`` baseline: as many units as ``median`` freezes, drawn uniformly
    at random by ``seed`` (alphas only set the count; the same seed draws the same units whatever the
    order of ``alphas``, e.g. after a JSON round trip with sorted keys).
    """
    names = list(alphas)
    if not names:
        return set()
    if rule == "median":
        m = statistics.median(alphas.values())
        return {n for n in names if alphas[n] < m}
    if rule == "random":
        count = len(frozen_units(alphas, "median"))
        return set(random.Random(seed).sample(sorted(names), count))
    if rule == "threshold":
        return {n for n in names if alphas[n] < alpha_threshold}
    order = sorted(names, key=lambda n: alphas[n])  # stable: ties keep model order
    if rule == "ratio":
        return set(order[: int(freeze_ratio * len(order))])
    if rule == "top_k":
        return set(order[: max(0, len(order) - int(k))])
    raise ValueError(f"unknown freeze rule {rule!r}")


def module_of(layer_name: str, module_names: set[str]) -> str:
    """The module (its name in ``module_names``) a layer of a report or config lives in: ``attn.qkv_q`` ->
    ``attn.qkv`` for fused splits, and a name relative to the CLIP vision tower resolved on the model
    (``encoder.layers.0.mlp.fc1`` -> ``vision_model.encoder.layers.0.mlp.fc1`` in a ``CLIPModel``, see
    :mod:`opentrans_hf.utils.naming`). KeyError if none; ValueError if several modules could be meant."""
    found = resolve_name(layer_name, module_names, what="layer")
    if found is not None:
        return found
    base, _, suffix = layer_name.rpartition("_")
    if suffix in ("q", "k", "v"):
        found = resolve_name(base, module_names, what="layer")
        if found is not None:
            return found
    raise KeyError(f"layer {layer_name!r} is not a module of the model")
