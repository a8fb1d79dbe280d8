"""The result of a spectral analysis: one :class:`LayerSpectrum` per layer, gathered in a
:class:`SpectralReport` that prints, serialises to JSON, converts to pandas and plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from opentrans_hf.spectral.estimators import ESTIMATORS, PRECISIONS, TailStatistics
from opentrans_hf.spectral.plotting import plot_report
from opentrans_hf.utils.io import atomic_write_text, is_integer, is_number, json_safe, read_json

STATUSES = ("ok", "skipped", "degenerate", "invalid")
LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding")
REPORT_FORMAT_VERSION = 1

# the range of each statistic a layer entry may hold (None: not measured; never NaN or infinite)
_AT_LEAST_ZERO = ("xmin", "xmax", "lambda_max", "norm", "stable_rank")
_ANY_FINITE = ("sigma", "log_spectral_norm", "alpha_weighted", "log_alpha_norm")


def _finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def _check_ok_alpha(name, status, alpha, where: str = "") -> None:
    """A layer whose status is "ok" has a finite, positive alpha: the one rule every median, ratio or
    threshold over a report relies on (a NaN alpha would sort anywhere and poison a median)."""
    if status == "ok" and not (_finite(alpha) and alpha > 0):
        raise ValueError(f"{where}layer {name!r} has status 'ok' but alpha {alpha!r}: an 'ok' layer needs a finite "
                         "alpha > 0 (a layer whose fit gave no such alpha is 'degenerate' or 'invalid')")


def _check_layer_entry(d: Mapping, where: str) -> None:
    """Every field of a report's layer entry typed and in range; errors name ``where`` (the file), the layer,
    the field and its value."""
    name = d["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}layer entry has the name {name!r}; expected a non-empty string (a module name)")
    if d.get("status", "ok") not in STATUSES:
        raise ValueError(f"{where}layer {name!r} has status {d['status']!r}; expected one of {STATUSES}")
    problems = []

    def bad(key, expected):
        problems.append(f"{key!r} must be {expected}, got {d[key]!r}")

    if d["kind"] not in LAYER_KINDS:
        bad("kind", f"one of {LAYER_KINDS}")
    shape = d["shape"]
    if not isinstance(shape, (list, tuple)) or not all(is_integer(s) and s >= 0 for s in shape):
        bad("shape", "a list of integers >= 0")
    if "num_evals" in d and not (is_integer(d["num_evals"]) and d["num_evals"] >= 0):
        bad("num_evals", "an integer >= 0")
    if "warning" in d and not isinstance(d["warning"], str):
        bad("warning", "a string")
    for key in ("alpha", *_ANY_FINITE):
        if d.get(key) is not None and not _finite(d[key]):
            bad(key, "a finite number or null")
    for key in _AT_LEAST_ZERO:
        if d.get(key) is not None and not (_finite(d[key]) and d[key] >= 0):
            bad(key, "a finite number >= 0 or null")
    if d.get("D") is not None and not (_finite(d["D"]) and 0 <= d["D"] <= 1):
        bad("D", "a Kolmogorov-Smirnov distance in [0, 1] or null")
    if d.get("num_pl_spikes") is not None and not (is_integer(d["num_pl_spikes"]) and d["num_pl_spikes"] >= 0):
        bad("num_pl_spikes", "an integer >= 0 or null")
    evals = d.get("eigenvalues")
    if evals is not None and not (isinstance(evals, list)
                                  and all(v is None or (_finite(v) and v >= 0) for v in evals)):
        bad("eigenvalues", "a list of finite numbers >= 0 (null for a value that was not finite) or null")
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise ValueError(f"{where}layer {name!r}: {shown}"[:2000])
    _check_ok_alpha(name, d.get("status", "ok"), d.get("alpha"), where)


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

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"layer {self.name!r} has status {self.status!r}; expected one of {STATUSES}")
        _check_ok_alpha(self.name, self.status, self.alpha)

    def to_dict(self, with_eigenvalues: bool = True) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not with_eigenvalues or self.eigenvalues is None:
            d.pop("eigenvalues")
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> LayerSpectrum:
        """A layer entry of a report's JSON, checked: known keys, every field typed and in range (statistics
        finite or null; an "ok" layer has a finite alpha > 0); errors name ``where``, the layer and the value."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}a layer entry must be a JSON object, got {d!r}"[:500])
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}layer entry has unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        for key in ("name", "kind", "shape"):
            if key not in d:
                raise ValueError(f"{where}layer entry misses the required key {key!r}: {dict(d)!r}"[:500])
        _check_layer_entry(d, where)
        kwargs = dict(d)
        kwargs["shape"] = tuple(d["shape"])
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
        """``name -> alpha`` for the layers whose status is "ok" (each finite and positive: a layer changed
        after it was made to hold another alpha is checked again here)."""
        for l in self.layers:
            _check_ok_alpha(l.name, l.status, l.alpha)
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
        """Read a report written by :meth:`to_json`, checked field by field (see :meth:`LayerSpectrum.from_dict`);
        an error names the file, the layer and the value."""
        path = Path(path)
        data = read_json(path, "spectral report")
        if not isinstance(data, dict) or "layers" not in data or "estimator" not in data:
            raise ValueError(f"{path} is not a spectral report: expected a JSON object with 'estimator' and 'layers'")
        where = f"{path}: "
        unknown = sorted(set(data) - {"format_version", "estimator", "model_class", "precision", "layers"})
        if unknown:
            raise ValueError(f"{where}unknown key(s) {unknown} in a spectral report")
        version = data.get("format_version", REPORT_FORMAT_VERSION)
        if not is_integer(version) or not 1 <= version <= REPORT_FORMAT_VERSION:
            raise ValueError(f"{where}format_version {version!r} is not one this version of opentrans-hf reads "
                             f"(1..{REPORT_FORMAT_VERSION})")
        if data["estimator"] not in ESTIMATORS:
            raise ValueError(f"{where}estimator {data['estimator']!r} is not one of {sorted(ESTIMATORS)}")
        if not isinstance(data.get("model_class", ""), str):
            raise ValueError(f"{where}model_class must be a string, got {data['model_class']!r}")
        if data.get("precision", "float64") not in PRECISIONS:
            raise ValueError(f"{where}precision {data['precision']!r} is not one of {sorted(PRECISIONS)}")
        if not isinstance(data["layers"], list):
            raise ValueError(f"{where}'layers' must be a list of layer entries, got {type(data['layers']).__name__}")
        layers = [LayerSpectrum.from_dict(d, where=where) for d in data["layers"]]
        seen = set()
        for layer in layers:
            if layer.name in seen:
                raise ValueError(f"{where}layer {layer.name!r} is listed twice")
            seen.add(layer.name)
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

