"""opentrans-hf: transferable and principled efficiency for open-vocabulary segmentation on HF."""

__version__ = "0.1.0"

from .random_clip import CLIP_SIZES, make_random_clip
from .spectral import LayerSpectrum, SpectralReport, analyze_spectra

__all__ = [
    "CLIP_SIZES",
    "LayerSpectrum",
    "SpectralReport",
    "__version__",
    "analyze_spectra",
    "make_random_clip",
]
