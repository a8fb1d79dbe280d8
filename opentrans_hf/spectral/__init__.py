"""Heavy-tail spectral analysis: which matrices a layer has, the estimators, the report."""

from opentrans_hf.spectral.analyze import analyze_spectra
from opentrans_hf.spectral.estimators import ESTIMATORS, TailFit, fit_opentrans, fit_ww, matrix_eigenvalues
from opentrans_hf.spectral.report import LayerSpectrum, SpectralReport

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
