"""opentrans-hf: transferable and principled efficiency for open-vocabulary segmentation on HF."""

__version__ = "0.1.0"

from .spectral import LayerSpectrum, SpectralReport, analyze_spectra

__all__ = ["LayerSpectrum", "SpectralReport", "__version__", "analyze_spectra"]
