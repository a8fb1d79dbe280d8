"""PNG plots of a spectral report (matplotlib is an optional dependency: ``pip install opentrans-hf[plot]``;
the figures come from :mod:`opentrans_hf.utils.plotting`, which leaves the process's matplotlib backend alone)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from opentrans_hf.spectral.estimators import EVALS_THRESH
from opentrans_hf.utils.io import atomic_write_with
from opentrans_hf.utils.plotting import figure


def plot_report(report, path: Path, frozen: Iterable[str] | None = None, num_esds: int = 4) -> Path:
    ok = [l for l in report.layers if l.status == "ok"]
    if not ok:
        raise ValueError("the report has no layer with status 'ok': nothing to plot")
    frozen = set(frozen) if frozen is not None else None
    with_esd = [l for l in ok if l.eigenvalues]
    picks = []
    if with_esd and num_esds > 0:
        by_alpha = sorted(with_esd, key=lambda l: l.alpha)
        positions = sorted({round(i * (len(by_alpha) - 1) / max(num_esds - 1, 1)) for i in range(num_esds)})
        picks = [by_alpha[p] for p in positions]

    rows = 2 if picks else 1
    fig = figure(figsize=(max(10, 0.18 * len(ok) + 4), 4.5 * rows))
    ax = fig.add_subplot(rows, 1, 1)
    xs = range(len(ok))
    alphas = [l.alpha for l in ok]
    if frozen is None:
        colors = ["tab:blue"] * len(ok)
    else:
        colors = ["tab:gray" if l.name in frozen else "tab:orange" for l in ok]
    ax.bar(xs, alphas, color=colors)
    ax.axhline(2.0, color="tab:green", ls="--", lw=1, label="alpha = 2 (heavy tail)")
    ax.axhline(6.0, color="tab:red", ls="--", lw=1, label="alpha = 6 (light tail)")
    if frozen is not None:
        from matplotlib.patches import Patch

        handles, _ = ax.get_legend_handles_labels()
        handles += [Patch(color="tab:gray", label="frozen"), Patch(color="tab:orange", label="trainable")]
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    else:
        ax.legend(loc="upper left", fontsize=8)
    ax.set_ylabel("alpha")
    ax.set_title(f"Heavy-tail alpha per layer ({report.estimator} estimator, {report.model_class})")
    if len(ok) <= 80:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([l.name for l in ok], rotation=90, fontsize=6)
    else:
        ax.set_xlabel("layer index (named_modules order)")

    for j, l in enumerate(picks):
        a = fig.add_subplot(rows, len(picks), len(picks) + j + 1)
        ev = [e for e in l.eigenvalues if e > EVALS_THRESH]
        lo, hi = math.log10(min(ev)), math.log10(max(ev))
        bins = [10 ** (lo + (hi - lo) * t / 60) for t in range(61)]
        a.hist(ev, bins=bins, density=True, color="tab:blue", alpha=0.6)
        # fitted power-law density on [xmin, xmax], scaled to the tail's share of the eigenvalues
        share = l.num_pl_spikes / len(ev) if l.num_pl_spikes else 1.0
        grid = [l.xmin * (l.xmax / l.xmin) ** (t / 50) for t in range(51)]
        pdf = [share * (l.alpha - 1) / l.xmin * (x / l.xmin) ** (-l.alpha) for x in grid]
        a.plot(grid, pdf, color="tab:red", lw=1.5, label=f"alpha={l.alpha:.2f}")
        a.axvline(l.xmin, color="tab:red", ls=":", lw=1)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_title(l.name, fontsize=7)
        a.legend(fontsize=7)
        a.set_xlabel("eigenvalue")
    fig.tight_layout()
    return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
