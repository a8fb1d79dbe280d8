"""Which weight matrices a model's layers have, per estimator. Reads weights, never writes them.

A :class:`LayerMatrices` describes one analysed "layer" of the report: a module (or one third of a
fused attention projection) and how to view its weight as a batch of matrices ``(k, rows, cols)``.
Building the list touches no weight data, so selection is instant even for huge models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from opentrans_hf.utils.matching import Patterns, is_selected

# WeightWatcher 0.7.7 analyze() defaults
WW_MIN_EVALS = 8
WW_MAX_EVALS = 15000
WW_MAX_N = 50000
# OpenTrans / TempBalance
OPENTRANS_CONV_NORM = 0.5
OPENTRANS_CLASSIFIER_RATIO = 8
WW_CONV2D_NORM = 0.5  # WeightWatcher multiplies every conv2d slice by sqrt(1/2)


@dataclass
class LayerMatrices:
    """One analysed layer: where its weight is and how to view it as matrices."""

    name: str
    module_name: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "embedding"
    shape: tuple[int, ...]  # shape of the analysed weight (or of the fused part)
    weight: torch.Tensor = field(repr=False)
    eig_scale: float = 1.0  # eigenvalues are multiplied by this (conv normalisation)
    transpose: bool = False  # transformers' Conv1D stores (in, out)
    part: tuple[int, int] | None = None  # (index, of) for a fused q/k/v split along the 3d axis
    skip_reason: str | None = None

    @property
    def slice_shape(self) -> tuple[int, int]:
        s = self.shape
        return (s[0], s[1])

    @property
    def num_slices(self) -> int:
        n = 1
        for d in self.shape[2:]:
            n *= d
        return n

    def matrices(self) -> torch.Tensor:
        """A view (no copy) of the weight as ``(k, rows, cols)``, rows = output features."""
        w = self.weight.detach()
        if self.transpose:
            w = w.t()
        if self.part is not None:
            i, of = self.part
            if w.shape[0] == of * w.shape[1]:
                d = w.shape[1]
                w = w[i * d : (i + 1) * d]
            else:
                d = w.shape[0]
                w = w[:, i * d : (i + 1) * d]
        if w.ndim == 2:
            return w.unsqueeze(0)
        # conv (out, in, *kernel) -> (prod(kernel), out, in): one slice per kernel position
        return w.flatten(2).permute(2, 0, 1)


def _kind_opentrans(module: nn.Module) -> str | None:
    """Class-name match as TempBalance/AlphaPruning (``isinstance(m, (nn.Conv2d, nn.Linear))``)."""
    cls = type(module).__name__.lower()
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if isinstance(module, nn.Linear) or cls == "linear":
        return "linear" if w.ndim == 2 else None
    if isinstance(module, nn.Conv2d) or cls == "conv2d":
        return "conv2d" if w.ndim == 4 else None
    if isinstance(module, nn.Conv1d) or cls == "conv1d":
        # nn.Conv1d has a 3-D weight; transformers' Conv1D is a dense layer stored (in, out)
        return "conv1d" if w.ndim == 3 else ("linear" if w.ndim == 2 else None)
    return None


def _kind_ww(module: nn.Module) -> str | None:
    """WeightWatcher's ``PyTorchLayer.layer_type``: isinstance or keyword in the lower-cased type string."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    typestr = str(type(module)).lower()
    if isinstance(module, nn.Linear) or "linear" in typestr:
        return "linear" if w.ndim == 2 else None
    if isinstance(module, nn.Conv1d) or "conv1d" in typestr:
        return "conv1d" if w.ndim == 3 else ("linear" if w.ndim == 2 else None)
    if isinstance(module, nn.Conv2d) or "conv2d" in typestr:
        return "conv2d" if w.ndim == 4 else None
    if isinstance(module, nn.Embedding) or "embedding" in typestr:
        return "embedding" if w.ndim == 2 else None
    return None


def _is_transformers_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.ndim == 2


def iter_layer_matrices(
    model: nn.Module,
    estimator: str,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
) -> Iterator[LayerMatrices]:
    """Yield the layers ``estimator`` analyses, in ``named_modules()`` order, skipped ones included."""
    for module_name, module in model.named_modules():
        kind = _kind_ww(module) if estimator == "ww" else _kind_opentrans(module)
        if kind is None or not is_selected(module_name, target_modules, exclude_modules):
            continue
        w = module.weight
        transpose = kind == "linear" and _is_transformers_conv1d(module)
        shape = tuple(w.shape[::-1]) if transpose else tuple(w.shape)
        if estimator == "ww":
            yield _ww_layer(module_name, kind, shape, w, transpose)
        else:
            yield from _opentrans_layers(module_name, kind, shape, w, transpose)


def _ww_layer(name: str, kind: str, shape, w, transpose) -> LayerMatrices:
    N, M = max(shape[:2]), min(shape[:2])
    rf = 1
    for d in shape[2:]:
        rf *= d
    lm = LayerMatrices(
        name, name, kind, shape, w, eig_scale=WW_CONV2D_NORM if kind == "conv2d" else 1.0, transpose=transpose
    )
    if M * rf < WW_MIN_EVALS:
        lm.skip_reason = f"too few eigenvalues: min(shape)*rf = {M * rf} < {WW_MIN_EVALS}"
    elif M * rf > WW_MAX_EVALS:
        lm.skip_reason = f"too many eigenvalues: min(shape)*rf = {M * rf} > {WW_MAX_EVALS}"
    elif N > WW_MAX_N:
        lm.skip_reason = f"matrix too large: max(shape) = {N} > {WW_MAX_N}"
    return lm


def _opentrans_layers(name: str, kind: str, shape, w, transpose) -> Iterator[LayerMatrices]:
    scale = OPENTRANS_CONV_NORM if kind in ("conv1d", "conv2d") else 1.0
    if kind == "linear":
        r, c = shape
        lname = name.lower()
        if ("attn" in lname or "attention" in lname) and (r == 3 * c or c == 3 * r):
            d = min(r, c)
            part_shape = (d, c) if r == 3 * c else (r, d)
            for i, suffix in enumerate("qkv"):
                yield LayerMatrices(
                    f"{name}_{suffix}", name, kind, part_shape, w, transpose=transpose, part=(i, 3)
                )
            return
        if max(r, c) / min(r, c) >= OPENTRANS_CLASSIFIER_RATIO:
            yield LayerMatrices(
                name, name, kind, shape, w, transpose=transpose,
                skip_reason=f"aspect ratio {max(r, c)}/{min(r, c)} >= {OPENTRANS_CLASSIFIER_RATIO} (treated as a classifier)",
            )
            return
    yield LayerMatrices(name, name, kind, shape, w, eig_scale=scale, transpose=transpose)
