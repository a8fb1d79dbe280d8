"""``analyze_spectra``: walk a model, compute every layer's eigenvalues in batches, fit the tails."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from opentrans_hf.spectral.estimators import ESTIMATORS, PRECISIONS, TailFit, matrix_eigenvalues
from opentrans_hf.spectral.layers import LayerMatrices, iter_layer_matrices
from opentrans_hf.spectral.report import LayerSpectrum, SpectralReport
from opentrans_hf.utils.matching import Patterns, normalize_patterns

DEFAULT_MAX_BATCH_BYTES = 256 * 2**20
CPU_THREAD_ENGINE = True  # False: CPU weights take the batched torch path too (what accelerators use)
EIGENSOLVER_ERRORS = (np.linalg.LinAlgError, torch.linalg.LinAlgError)  # e.g. no convergence: that layer is "invalid"
RANK_TOL = 1e-10  # an eigenvalue below RANK_TOL * (largest of its matrix) counts as zero for the rank check


def analyze_spectra(
    model: nn.Module,
    *,
    estimator: str = "opentrans",
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    keep_eigenvalues: bool = False,
    precision: str = "float64",
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> SpectralReport:
    """Measure the heavy-tail exponent alpha of every analysable layer of ``model``.

    Args:
        model: any ``torch.nn.Module`` (transformers models included).
        estimator: ``"opentrans"`` (the OpenTrans paper's estimator: Linear/Conv layers, fused
            q/k/v split, classifier-shaped Linear skipped, conv eigenvalues halved, xmin searched
            near the ESD peak) or ``"ww"`` (WeightWatcher 0.7.7 ``analyze()`` defaults: also
            Embedding layers, WeightWatcher's size limits, KS-optimal xmin over all eigenvalues).
        target_modules / exclude_modules: PEFT's matching rules on ``named_modules()`` names (a
            string is a full-match regex, a list matches exact names or dotted suffixes).
        device: where the eigenvalues are computed (e.g. ``"cuda"``); default: each weight's own
            device. Weights are copied there at most ``max_batch_bytes`` at a time (always at least
            one layer), so a model never has to fit on the device at once.
        progress: show a tqdm bar over layers.
        keep_eigenvalues: keep every layer's eigenvalues in the report (needed for ESD plots).
        precision: ``"float64"`` (exact; the default) or ``"float32"`` (faster eigenvalues for big
            models; alphas agree to about 1e-3 relative, the fit itself stays float64).

    Returns:
        A :class:`SpectralReport`. Layers that cannot be fitted are reported, never dropped:
        ``"skipped"`` (outside the estimator's layer rules), ``"invalid"`` (NaN/Inf weights, or the
        eigensolver failed, e.g. did not converge; the reason is the layer's ``warning``),
        ``"degenerate"`` (zero, constant, rank <= 1 or flat spectrum; no alpha).

    The model is only read: weights, ``requires_grad`` and devices are left as they are.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze_spectra expects a torch.nn.Module, got {type(model).__name__}")
    target_modules = normalize_patterns(target_modules)
    exclude_modules = normalize_patterns(exclude_modules)
    fit_fn = ESTIMATORS[estimator]
    dtype = PRECISIONS[precision]

    specs = list(iter_layer_matrices(model, estimator, target_modules, exclude_modules))
    todo = [i for i, s in enumerate(specs) if s.skip_reason is None]
    if not todo:
        searched = "Linear, Conv1d, Conv2d, transformers Conv1D" + (", Embedding" if estimator == "ww" else "")
        detail = f"; {len(specs)} candidate(s) were all skipped: {specs[0].skip_reason}" if specs else ""
        raise ValueError(
            f"no analysable layer in {type(model).__name__} for estimator {estimator!r}: searched modules of "
            f"class {searched} with target_modules={target_modules!r}, exclude_modules={exclude_modules!r}{detail}"
        )
    bar = tqdm(total=len(specs), disable=not progress, desc=f"alpha ({estimator})", unit="layer")
    results = _fit_layers(specs, todo, fit_fn, dtype, device, max_batch_bytes, keep_eigenvalues, bar)
    bar.close()
    return SpectralReport(results, estimator, type(model).__name__, precision)


def _fit_layers(specs: list[LayerMatrices], todo: list[int], fit_fn, dtype: torch.dtype, device, max_batch_bytes: int,
                keep_eigenvalues: bool, bar) -> list[LayerSpectrum]:
    """One :class:`LayerSpectrum` per spec, in order: the skipped ones as such, the others fitted as their
    eigenvalues arrive (``"invalid"`` where the weight or the eigensolver failed); ``bar`` counts layers."""
    results: list[LayerSpectrum | None] = [None] * len(specs)
    for i, s in enumerate(specs):
        if s.skip_reason is not None:
            results[i] = LayerSpectrum(s.name, s.kind, s.shape, status="skipped", warning=s.skip_reason)
    bar.update(len(specs) - len(todo))
    with torch.no_grad():
        for i, evals in layer_eigenvalues(specs, todo, dtype, device, max_batch_bytes):
            s = specs[i]
            if isinstance(evals, str):
                results[i] = LayerSpectrum(s.name, s.kind, s.shape, status="invalid", warning=evals)
            else:
                results[i] = _layer_result(s, evals, fit_fn, keep_eigenvalues)
            bar.update(1)
    return results


def layer_eigenvalues(specs, todo, dtype=torch.float64, device=None, max_batch_bytes=DEFAULT_MAX_BATCH_BYTES):
    """Yield ``(i, eigenvalues (k, m) float64 CPU tensor)`` -- or ``(i, reason)`` for an invalid weight --
    for every index ``i`` in ``todo``. The eigenvalue computation of ``analyze_spectra``, also used
    alone as the benchmark's floor.

    CPU weights (no ``device``): one layer per task on a pool of ``torch.get_num_threads()`` threads,
    each running single-threaded BLAS/LAPACK (NumPy: ``A @ A.T`` uses SYRK, ``eigvalsh`` uses SYEVD).
    The symmetric eigensolver scales poorly over threads, independent layers scale perfectly.
    Otherwise (``device="cuda"``, or weights on an accelerator): same-shape layers are batched on the
    device, at most ``max_batch_bytes`` at a time.
    """
    on_cpu = CPU_THREAD_ENGINE and (device is None or torch.device(device).type == "cpu") and all(
        specs[i].weight.device.type == "cpu" for i in todo
    )
    if on_cpu:
        yield from _cpu_eigenvalues(specs, todo, dtype)
        return
    for chunk in _chunks(specs, todo, dtype.itemsize, max_batch_bytes):
        yield from _chunk_eigenvalues(specs, chunk, dtype, device)


def _cpu_eigenvalues(specs, todo, dtype):
    def one(i):
        w = specs[i].matrices()
        reason = _invalid_reason(w)
        if reason is not None:
            return i, reason
        try:
            return i, numpy_eigenvalues(w.to(dtype).numpy())
        except EIGENSOLVER_ERRORS as err:
            return i, _solver_failure(err, dtype)

    workers = max(1, torch.get_num_threads())
    torch.set_num_threads(1)  # each worker is single-threaded; restored below
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            yield from pool.map(one, todo)  # in order; the caller fits layer i while later layers compute
    finally:
        torch.set_num_threads(workers)


def numpy_eigenvalues(mats) -> torch.Tensor:
    """CPU twin of :func:`matrix_eigenvalues` for a ``(k, r, c)`` NumPy array: float64 ``(k, m)``.

    The Gram matrices are 2-D NumPy products (``m @ m.T`` dispatches to SYRK, half a GEMM). The
    symmetric eigensolver is NumPy's (OpenBLAS) in float64 and torch's (MKL) in float32: each is the
    faster of the two for its precision on single-threaded CPU (measured in scripts/bench_spectral.py).
    """
    grams = np.stack([m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m for m in mats])
    if grams.dtype == np.float32:
        evals = torch.linalg.eigvalsh(torch.from_numpy(grams))
    else:
        evals = torch.from_numpy(np.linalg.eigvalsh(grams))
    return evals.to(torch.float64).clamp_min_(0)


def _chunks(specs: list[LayerMatrices], todo: list[int], itemsize: int, budget: int):
    """Group layers whose matrices have the same shape into batches of at most ``budget`` bytes."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in todo:
        groups[specs[i].slice_shape].append(i)
    for (r, c), idx in groups.items():
        chunk, size = [], 0
        for i in idx:
            nbytes = specs[i].num_slices * r * c * itemsize
            if chunk and size + nbytes > budget:
                yield chunk
                chunk, size = [], 0
            chunk.append(i)
            size += nbytes
        if chunk:
            yield chunk


def _chunk_eigenvalues(specs, chunk, dtype, device):
    """Yield ``(i, eigenvalues (k, m))`` for the layers of one chunk, one batched eigensolve."""
    mats, owners = [], []
    for i in chunk:
        w = specs[i].matrices()
        reason = _invalid_reason(w)
        if reason is not None:
            yield i, reason
            continue
        mats.append(w.to(device=device if device is not None else w.device, dtype=dtype))
        owners.append(i)
    if not mats:
        return
    if len({m.device for m in mats}) > 1:  # weights spread over devices (device_map="auto"): one by one
        batches = [(m, [i]) for m, i in zip(mats, owners)]
    else:
        batches = [(torch.cat(mats) if len(mats) > 1 else mats[0], owners)]
    for batch, who in batches:
        yield from _solve(specs, batch, who, dtype)


def _solve(specs, batch, who, dtype):
    """One batched eigensolve; if it fails, each layer alone, so that only the failing ones are invalid."""
    try:
        evals = matrix_eigenvalues(batch).to(torch.float64)
    except EIGENSOLVER_ERRORS as err:
        if len(who) == 1:
            yield who[0], _solver_failure(err, dtype)
            return
        start = 0
        for i in who:
            k = specs[i].num_slices
            yield from _solve(specs, batch[start : start + k], [i], dtype)
            start += k
        return
    start = 0
    for i in who:
        k = specs[i].num_slices
        yield i, evals[start : start + k]
        start += k


def _solver_failure(err: Exception, dtype: torch.dtype) -> str:
    hint = "; precision='float64' may converge" if dtype == torch.float32 else ""
    return f"eigensolver failed ({type(err).__name__.lstrip('_')}: {err}){hint}"


def _invalid_reason(w: torch.Tensor) -> str | None:
    if w.device.type == "meta":
        return "weight is on the meta device (not materialised): load the model's weights first"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int((~finite).sum()) - n_nan
        return f"weight has {n_nan} NaN and {n_inf} Inf value(s)"
    return None


def _layer_result(spec: LayerMatrices, evals: torch.Tensor, fit_fn, keep: bool) -> LayerSpectrum:
    """Rank check per matrix, conv scaling, then the estimator's fit."""
    lam = evals.amax(dim=1, keepdim=True)
    rank = (evals > RANK_TOL * lam).sum(dim=1)
    flat = (evals * spec.eig_scale).reshape(-1)
    if int(rank.max()) <= 1:
        what = "all-zero" if float(lam.max()) == 0.0 else "rank <= 1 (e.g. constant)"
        fit = TailFit(status="degenerate", reason=f"{what} weight matrix: no spectrum to fit")
    else:
        fit = fit_fn(flat)
    out = LayerSpectrum(spec.name, spec.kind, spec.shape, flat.numel(), **fit.statistics(), status=fit.status,
                        warning=fit.reason or _training_warning(fit.alpha))
    if keep:
        out.eigenvalues = torch.sort(flat).values.cpu().tolist()
    return out


def _training_warning(alpha: float | None) -> str:
    """WeightWatcher's labels: alpha < 2 over-trained, alpha > 6 under-trained."""
    if alpha is None:
        return ""
    if alpha < 2:
        return "over-trained"
    if alpha > 6:
        return "under-trained"
    return ""
