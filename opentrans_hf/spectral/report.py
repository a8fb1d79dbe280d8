"""The result of a spectral analysis: one :class:`LayerSpectrum` per layer, gathered in a
:class:`SpectralReport` that prints, serialises to JSON, converts to pandas and plots."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from opentrans_hf.spectral.estimators import TailStatistics
from opentrans_hf.spectral.plotting import plot_report
from opentrans_hf.utils.io import atomic_write_text, json_safe, read_json

STATUSES = ("ok", "skipped", "degenerate", "invalid")
REPORT_FORMAT_VERSION = 1


@dataclass
class _LayerIdentity:
    """Which layer: the first fields of :class:`LayerSpectrum`, before its statistics."""

    name: str
    kind: str
    shape: tuple[int, ...]
    num_evals: int = 0


@dataclass(kw_only=True)
class LayerSpectrum(TailStatistics, _LayerIdentity):
    """Heavy-tail statistics of one layer (``named_modules()`` name; ``_q/_k/_v`` for fused splits): its
    identity (``name, kind, shape, num_evals``, positional), the :class:`TailStatistics` of its fit, its
    ``status`` and ``warning`` (keywords)."""

    status: str = "ok"
    warning: str = ""
    eigenvalues: list[float] | None = field(default=None, repr=False)

    def to_dict(self, with_eigenvalues: bool = True) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not with_eigenvalues or self.eigenvalues is None:
            d.pop("eigenvalues")
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> LayerSpectrum:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}layer entry has unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        for key in ("name", "kind", "shape"):
            if key not in d:
                raise ValueError(f"{where}layer entry misses the required key {key!r}: {dict(d)!r}")
        kwargs = dict(d)
        kwargs["shape"] = tuple(int(s) for s in d["shape"])
        if kwargs.get("status", "ok") not in STATUSES:
            raise ValueError(f"{where}layer {d['name']!r} has status {kwargs['status']!r}; expected one of {STATUSES}")
        return cls(**kwargs)


@dataclass
class SpectralReport:
    """All layers of one analysis, in ``named_modules()`` order."""

    layers: list[LayerSpectrum]
    estimator: str
    model_class: str = ""
    precision: str = "float64"

    # ---- access -------------------------------------------------------------------------
    @property
    def alphas(self) -> dict[str, float]:
        """``name -> alpha`` for the layers whose status is "ok"."""
        return {l.name: l.alpha for l in self.layers if l.status == "ok"}

    def __getitem__(self, name: str) -> LayerSpectrum:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the report; layers: {[l.name for l in self.layers][:20]}...")

    def __len__(self) -> int:
        return len(self.layers)

    def counts(self) -> dict[str, int]:
        return {s: sum(l.status == s for l in self.layers) for s in STATUSES}

    def summary(self) -> str:
        """A human-readable table: one line per layer and the alpha distribution of the ok layers."""
        a = list(self.alphas.values())
        c = self.counts()
        lines = [
            f"SpectralReport(estimator={self.estimator!r}, model={self.model_class}, precision={self.precision})",
            "layers: " + ", ".join(f"{v} {k}" for k, v in c.items() if v),
        ]
        if a:
            lines.append(
                f"alpha: mean {statistics.fmean(a):.3f}  median {statistics.median(a):.3f}  "
                f"min {min(a):.3f}  max {max(a):.3f}  (<2: {sum(x < 2 for x in a)}, >6: {sum(x > 6 for x in a)})"
            )
        width = max((len(l.name) for l in self.layers), default=10)
        lines.append(f"{'layer':<{width}}  {'shape':<18} {'alpha':>8} {'xmin':>10} {'D':>7}  status")
        for l in self.layers:
            alpha = f"{l.alpha:8.3f}" if l.alpha is not None else f"{'-':>8}"
            xmin = f"{l.xmin:10.4g}" if l.xmin is not None else f"{'-':>10}"
            D = f"{l.D:7.4f}" if l.D is not None else f"{'-':>7}"
            note = f"{l.status}" + (f" ({l.warning})" if l.warning else "")
            lines.append(f"{l.name:<{width}}  {str(tuple(l.shape)):<18} {alpha} {xmin} {D}  {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self, with_eigenvalues: bool = True) -> dict:
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "estimator": self.estimator,
            "model_class": self.model_class,
            "precision": self.precision,
            "layers": [l.to_dict(with_eigenvalues) for l in self.layers],
        }

    def to_json(self, path: str | Path, with_eigenvalues: bool = False) -> Path:
        """Write the report as JSON (atomically). Eigenvalues are left out unless asked for."""
        path = Path(path)
        text = json.dumps(json_safe(self.to_dict(with_eigenvalues)), indent=2, allow_nan=False)
        atomic_write_text(path, text + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> SpectralReport:
        path = Path(path)
        data = read_json(path, "spectral report")
        if not isinstance(data, dict) or "layers" not in data or "estimator" not in data:
            raise ValueError(f"{path} is not a spectral report: expected a JSON object with 'estimator' and 'layers'")
        layers = [LayerSpectrum.from_dict(d, where=f"{path}: ") for d in data["layers"]]
        return cls(layers, data["estimator"], data.get("model_class", ""), data.get("precision", "float64"))

    def to_pandas(self):
        """A ``pandas.DataFrame`` with one row per layer (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("SpectralReport.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame([l.to_dict(with_eigenvalues=False) for l in self.layers])

    # ---- plotting -----------------------------------------------------------------------
    def plot(self, path: str | Path, frozen: Iterable[str] | None = None, num_esds: int = 4) -> Path:
        """Save a PNG: alpha per layer (guides at 2 and 6; frozen/trainable colours when ``frozen``
        names are given) and, when eigenvalues were kept, log-log ESDs of a few layers with their
        fitted power-law tails (the smallest, median and largest alpha)."""
        return plot_report(self, Path(path), frozen=frozen, num_esds=num_esds)

