"""opentrans-hf: transferable and principled efficiency for open-vocabulary segmentation on HF."""

__version__ = "0.1.0"

from .pretraining import pretrain_clip, pretrained_clip
from .pruning import (
    IMPConfig,
    SparseMask,
    count_params_and_flops,
    iterative_magnitude_prune,
    load_sparse_pretrained,
    magnitude_prune,
    save_sparse_pretrained,
)
from .random_clip import CLIP_SIZES, make_random_clip
from .spectral import LayerSpectrum, SpectralReport, analyze_spectra
from .tuning import (
    SpectralModel,
    SpectralTuningConfig,
    estimate_training_flops,
    freeze_unused_parameters,
    get_spectral_model,
    spectral_param_groups,
)

__all__ = [
    "CLIP_SIZES",
    "IMPConfig",
    "LayerSpectrum",
    "SpectralModel",
    "SpectralReport",
    "SparseMask",
    "SpectralTuningConfig",
    "__version__",
    "analyze_spectra",
    "count_params_and_flops",
    "estimate_training_flops",
    "freeze_unused_parameters",
    "get_spectral_model",
    "iterative_magnitude_prune",
    "load_sparse_pretrained",
    "magnitude_prune",
    "make_random_clip",
    "pretrain_clip",
    "pretrained_clip",
    "save_sparse_pretrained",
    "spectral_param_groups",
]
