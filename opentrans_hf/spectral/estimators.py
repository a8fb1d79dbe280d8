"""Heavy-tail estimators: tensors in, numbers out.

Nothing here knows about models. Two estimators are implemented exactly as their reference code
computes them:

* :func:`fit_opentrans` -- the estimator the OpenTrans paper used to choose frozen layers
  (TempBalance / AlphaPruning ``net_esd_estimator`` with ``fix_fingers="xmin_peak"``).
* :func:`fit_ww` -- WeightWatcher 0.7.7 ``analyze()`` with its defaults (``WWFit``: the
  standard continuous power-law MLE + KS scan, and the small-N variant below 20 eigenvalues).

Both scan every candidate ``xmin`` at once: suffix sums of ``log(x)`` give every candidate's MLE,
and the Kolmogorov-Smirnov distances are computed in memory-bounded blocks of candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

EVALS_THRESH = 1e-5
"""Eigenvalues at or below this are treated as zero (both originals use 1e-5)."""

SMALL_N_CUTOFF = 20
"""WeightWatcher switches to its small-N fit below this many non-zero eigenvalues."""

FLAT_RTOL = 1e-4
"""A spectrum whose largest eigenvalue is within this relative distance of its smallest has no tail
(1e-4: an orthogonal float32 or float16 weight is flat to within its rounding, not exactly)."""

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
"""The dtypes eigenvalues are computed in (``analyze_spectra(precision=...)``, a report's ``precision``)."""

_KS_BLOCK_ELEMENTS = 1 << 22  # at most 4M float64 (32 MiB) per block of the KS scan


@dataclass(kw_only=True)
class TailStatistics:
    """The statistics of one layer's eigenvalues and their power-law tail, declared once for
    :class:`TailFit` and the report's ``LayerSpectrum``."""

    alpha: float | None = None
    xmin: float | None = None
    xmax: float | None = None
    D: float | None = None
    sigma: float | None = None
    num_pl_spikes: int | None = None
    lambda_max: float | None = None
    norm: float | None = None
    log_spectral_norm: float | None = None
    alpha_weighted: float | None = None
    log_alpha_norm: float | None = None
    stable_rank: float | None = None


SPECTRUM_STATISTICS = ("lambda_max", "norm", "log_spectral_norm", "stable_rank")
"""The statistics of the whole spectrum, defined without a tail fit (the others need one)."""


@dataclass(kw_only=True)
class TailFit(TailStatistics):
    """Result of one power-law tail fit. ``status`` is "ok" or "degenerate" (with ``reason``)."""

    status: str = "ok"
    reason: str | None = None

    def statistics(self) -> dict[str, float | int | None]:
        """``{name: value}`` of the :class:`TailStatistics` a layer reports: all of them when the fit is
        "ok", else only the :data:`SPECTRUM_STATISTICS` (the tail's are None)."""
        ok = self.status == "ok"
        return {f.name: getattr(self, f.name) if ok or f.name in SPECTRUM_STATISTICS else None
                for f in fields(TailStatistics)}


def matrix_eigenvalues(mats: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``W^T W`` for a batch of matrices ``(B, r, c)``: ``(B, min(r, c))``, ascending.

    Uses the smaller Gram matrix and a symmetric eigensolver, clamped at 0 (the squared singular
    values, without 1/N normalisation). Computed in the dtype and on the device of ``mats``.
    """
    if mats.ndim != 3:
        raise ValueError(f"expected a batch of matrices (B, rows, cols), got shape {tuple(mats.shape)}")
    if mats.shape[-2] <= mats.shape[-1]:
        gram = mats @ mats.mT
    else:
        gram = mats.mT @ mats
    return torch.linalg.eigvalsh(gram).clamp_min_(0)


def ks_distances(x: torch.Tensor, idx: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """KS distance of the power law (xmin = x[i], exponent a) from the empirical tail x[i:].

    ``D_i = max_j>=i | 1 - (x_j / x_i) ** (1 - a_i) - (j - i) / (n - i) |`` for each ``i`` in
    ``idx`` (with its ``a_i`` in ``alphas``); ``x`` is sorted ascending. Blocks of candidates keep
    the memory at ``_KS_BLOCK_ELEMENTS`` float64 values whatever ``len(x)``.
    """
    n_all = x.numel()
    out = torch.empty(idx.numel(), dtype=x.dtype, device=x.device)
    if idx.numel() == 0:
        return out
    pos = torch.arange(n_all, device=x.device, dtype=x.dtype)
    rows = max(1, _KS_BLOCK_ELEMENTS // max(n_all, 1))
    for b0 in range(0, idx.numel(), rows):
        bi = idx[b0 : b0 + rows]
        ba = alphas[b0 : b0 + rows]
        c0 = int(bi[0])  # candidates are ascending: columns before the first are never needed
        xs = x[c0:]
        ratio = xs.unsqueeze(0) / x[bi].unsqueeze(1)
        theo = 1.0 - ratio.pow((1.0 - ba).unsqueeze(1))
        offs = pos[c0:].unsqueeze(0) - bi.to(x.dtype).unsqueeze(1)  # j - i
        n = (n_all - bi).to(x.dtype).unsqueeze(1)
        diff = (theo - offs / n).abs()
        diff = torch.where(offs >= 0, diff, torch.zeros((), dtype=x.dtype, device=x.device))
        out[b0 : b0 + rows] = diff.amax(dim=1)
    return out


def _tail_mle(L: torch.Tensor, numerator_offset: float) -> torch.Tensor:
    """For every candidate i in 0..N-2: ``1 + (n - offset) / (sum(L[i:]) - n * L[i])``, n = N - i."""
    N = L.numel()
    suffix = torch.flip(torch.cumsum(torch.flip(L, [0]), 0), [0])  # suffix[i] = sum(L[i:])
    n = torch.arange(N, 0, -1, dtype=L.dtype, device=L.device)[: N - 1]
    return 1.0 + (n - numerator_offset) / (suffix[: N - 1] - n * L[: N - 1]), n


def _summary_stats(fit: TailFit, evals: torch.Tensor) -> None:
    """lambda_max, norm, stable rank and the alpha-weighted norms, from ``evals`` (float64)."""
    lam = float(evals.max())
    norm = float(evals.sum())
    fit.lambda_max = lam
    fit.norm = norm
    fit.stable_rank = norm / lam if lam > 0 else None
    fit.log_spectral_norm = math.log10(lam) if lam > 0 else None
    if fit.alpha is not None and lam > 0:
        fit.alpha_weighted = fit.alpha * math.log10(lam)
        s = float(evals.pow(fit.alpha).sum())
        fit.log_alpha_norm = math.log10(s) if s > 0 and math.isfinite(s) else None


def _fit_at(x: torch.Tensor, alphas: torch.Tensor, Ds: torch.Tensor, k: int, evals: torch.Tensor) -> TailFit:
    """The fit whose xmin is candidate ``k`` of the sorted eigenvalues ``x`` (exponent ``alphas[k]``, KS
    distance ``Ds[k]``); its spikes are the eigenvalues of ``evals`` at or above xmin."""
    alpha = float(alphas[k])
    return TailFit(alpha=alpha, xmin=float(x[k]), xmax=float(x[-1]), D=float(Ds[k]),
                   sigma=(alpha - 1.0) / math.sqrt(x.numel() - k), num_pl_spikes=int((evals >= x[k]).sum()))


def _degenerate(reason: str, evals: torch.Tensor) -> TailFit:
    fit = TailFit(status="degenerate", reason=reason)
    if evals.numel():
        _summary_stats(fit, evals)
    return fit


def fit_ww(evals: torch.Tensor) -> TailFit:
    """WeightWatcher 0.7.7's default power-law fit of one layer's pooled eigenvalues.

    ``evals``: all eigenvalues of the layer (any order, float64). Returns the ``TailFit`` that
    ``WeightWatcher().analyze()`` reports (alpha, xmin, xmax, D, sigma, num_pl_spikes, and the
    norm statistics over *all* eigenvalues), or a "degenerate" fit when fewer than two eigenvalues
    exceed 1e-5 or the fit is not finite (where WeightWatcher would fail or report garbage).
    """
    evals = evals.reshape(-1)
    x = torch.sort(evals[evals > EVALS_THRESH]).values
    n_all = x.numel()
    if n_all < 2:
        return _degenerate(f"only {n_all} eigenvalue(s) above {EVALS_THRESH:g}: nothing to fit", evals)
    if float(x[-1]) <= float(x[0]) * (1 + FLAT_RTOL):
        return _degenerate("flat spectrum (all non-zero eigenvalues equal): no tail to fit", evals)
    L = torch.log(x)
    if n_all < SMALL_N_CUTOFF:
        alphas, Ds, k = _ww_small_n(x, L)
    else:
        alphas, n = _tail_mle(L, 0.0)
        Ds = torch.ones_like(alphas)
        ok = alphas > 1
        idx = torch.nonzero(ok).flatten()
        Ds[idx] = ks_distances(x, idx, alphas[idx])
        k = int(torch.argmin(Ds))
    fit = _fit_at(x, alphas, Ds, k, evals)
    if not math.isfinite(fit.alpha) or not math.isfinite(fit.D) or fit.alpha <= 1.0:
        return _degenerate(f"power-law fit did not converge (alpha={fit.alpha})", evals)
    _summary_stats(fit, evals)
    return fit


def _ww_small_n(x: torch.Tensor, L: torch.Tensor, k_min: int = 8):
    """WeightWatcher's ``fit_powerlaw_smallN`` as 0.7.7 actually reports it.

    The bias-corrected MLE ``1 + (n - 1) / sum(log(x_j / xmin))`` and the KS distance are computed for
    candidates with a tail of at least ``k_min`` eigenvalues; ``fit_powerlaw_smallN`` then picks the
    candidate minimising ``D - 0.868 / sqrt(n)``, but ``WWFit.__init__`` overrides that choice with
    ``argmin(Ds)`` (non-qualifying candidates keep D = 1). The reported fit is therefore the
    KS-minimising qualifying candidate; this reproduces what ``analyze()`` returns (the J criterion of
    the specification's pseudo-code never reaches the output). When no candidate qualifies,
    WeightWatcher fits the whole spectrum (candidate 0).
    """
    n_all = x.numel()
    alphas = torch.zeros(n_all - 1, dtype=x.dtype, device=x.device)
    Ds = torch.ones(n_all - 1, dtype=x.dtype, device=x.device)
    qualified = False
    for i in range(n_all - 1):
        n = n_all - i
        if n < k_min:
            continue
        s = float(L[i:].sum() - n * L[i])
        if s <= 1e-12:
            continue
        a = 1.0 + (n - 1.0) / s
        alphas[i] = a
        if a <= 1.0:
            continue
        Ds[i] = ks_distances(x, torch.tensor([i], device=x.device), alphas[i : i + 1])[0]
        qualified = True
    if not qualified:
        s = float(L.sum() - n_all * L[0])
        if s > 1e-12:
            alphas[0] = 1.0 + (n_all - 1.0) / s
            Ds[0] = ks_distances(x, torch.tensor([0], device=x.device), alphas[:1])[0]
    return alphas, Ds, int(torch.argmin(Ds))


def fit_opentrans(evals: torch.Tensor, bins: int = 100) -> TailFit:
    """The OpenTrans paper's estimator (``net_esd_estimator(fix_fingers="xmin_peak")``).

    ``evals``: all eigenvalues of the layer (conv layers already scaled by ``conv_norm=0.5``).
    The candidate window for ``xmin`` is ``[log10(0.95 * p), 1.5 * p]`` with ``p`` the left edge of
    the fullest of 100 log10-histogram bins. The lower bound mixes a log10 value with linear
    eigenvalues: that is a quirk of the original code, reproduced on purpose so that alphas (and
    hence the frozen layers) match the paper's. Statistics (lambda_max, norm, ...) are over the
    non-zero eigenvalues, as in the original.
    """
    eigs = torch.sort(evals.reshape(-1)).values
    nz = eigs[eigs > EVALS_THRESH]
    if nz.numel() == 0:
        nz = eigs
    N = nz.numel()
    if N < 2:
        return _degenerate(f"only {N} eigenvalue(s): nothing to fit", nz)
    if float(nz[-1]) <= float(nz[0]) * (1 + FLAT_RTOL):
        return _degenerate("flat spectrum (all eigenvalues equal): no tail to fit", nz)
    L = torch.log(nz)
    h = torch.log10(nz)
    h_min, h_max = float(h.min()), float(h.max())
    counts = torch.histc(h, bins=bins, min=h_min, max=h_max)
    edges = torch.linspace(h_min, h_max, bins + 1, dtype=nz.dtype, device=nz.device)
    xmin2 = 10 ** float(edges[int(torch.argmax(counts))])
    lo = math.log10(0.95 * xmin2)  # sic: log-scale bound compared with linear eigenvalues (original quirk)
    hi = 1.5 * xmin2
    cand = nz[: N - 1]
    in_window = (cand >= lo) & (cand <= hi)
    # the original loop `continue`s below lo and `break`s at the first value above hi
    above = torch.nonzero(cand > hi).flatten()
    if above.numel():
        in_window[int(above[0]) :] = False
    idx = torch.nonzero(in_window).flatten()
    alphas = torch.zeros(N - 1, dtype=nz.dtype, device=nz.device)
    Ds = torch.ones(N - 1, dtype=nz.dtype, device=nz.device)
    if idx.numel() == 0:
        return _degenerate(
            f"no xmin candidate in the xmin_peak window [{lo:.4g}, {hi:.4g}]: alpha undefined", nz
        )
    all_alphas, _ = _tail_mle(L, 0.0)
    alphas[idx] = all_alphas[idx]
    fit_idx = idx[alphas[idx] > 1]
    Ds[fit_idx] = ks_distances(nz, fit_idx, alphas[fit_idx])
    k = int(torch.argmin(Ds))
    fit = _fit_at(nz, alphas, Ds, k, nz)
    if not math.isfinite(fit.alpha) or fit.alpha <= 1.0:
        return _degenerate(f"power-law fit did not converge (alpha={fit.alpha})", nz)
    _summary_stats(fit, nz)
    return fit


ESTIMATORS = {"opentrans": fit_opentrans, "ww": fit_ww}
