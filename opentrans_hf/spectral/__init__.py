"""Heavy-tail spectral analysis: which matrices a layer has, the estimators, the report."""

from .analyze import analyze_spectra
from .estimators import ESTIMATORS, TailFit, fit_opentrans, fit_ww, matrix_eigenvalues
from .report import LayerSpectrum, SpectralReport

__all__ = [
    "ESTIMATORS",
    "LayerSpectrum",
    "SpectralReport",
    "TailFit",
    "analyze_spectra",
    "fit_opentrans",
    "fit_ww",
    "matrix_eigenvalues",
]
