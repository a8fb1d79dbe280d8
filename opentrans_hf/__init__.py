"""opentrans-hf: transferable and principled efficiency for open-vocabulary segmentation on HF."""

from opentrans_hf.embedded.random_clip import CLIP_SIZES, make_random_clip
from opentrans_hf.methods.sparse_mask import (
    IMPConfig,
    SparseMask,
    count_params_and_flops,
    iterative_magnitude_prune,
    load_sparse_pretrained,
    magnitude_prune,
    save_sparse_pretrained,
)
from opentrans_hf.methods.spectral_tuning import (
    SpectralModel,
    SpectralTuningConfig,
    estimate_training_flops,
    freeze_unused_parameters,
    get_spectral_model,
    spectral_param_groups,
)
from opentrans_hf.models import (
    FRAMEWORKS,
    CLIPDeepLabV3Config,
    CLIPDeepLabV3ForOVS,
    CLIPDenseZeroShot,
    CLIPFCCLIPConfig,
    CLIPFCCLIPForOVS,
    CLIPMask2FormerConfig,
    CLIPMask2FormerForOVS,
    OVSConfig,
    OVSImageProcessor,
    OVSPreTrainedModel,
    OVSProcessor,
    register_auto_classes,
)
from opentrans_hf.pipelines.segmentation import OpenVocabularySegmentationPipeline, register_pipeline
from opentrans_hf.spectral import LayerSpectrum, SpectralReport, analyze_spectra
from opentrans_hf.training.pretraining import pretrain_clip, pretrained_clip
from opentrans_hf.utils.version import __version__

# What importing opentrans_hf does, and nothing else: AutoConfig / AutoModel / AutoImageProcessor / AutoProcessor
# know the frameworks, and pipeline("open-vocabulary-segmentation", ...) works.
register_auto_classes()
register_pipeline()

__all__ = [
    "CLIPDeepLabV3Config",
    "CLIPDeepLabV3ForOVS",
    "CLIPDenseZeroShot",
    "CLIPFCCLIPConfig",
    "CLIPFCCLIPForOVS",
    "CLIPMask2FormerConfig",
    "CLIPMask2FormerForOVS",
    "FRAMEWORKS",
    "OVSConfig",
    "OVSImageProcessor",
    "OVSPreTrainedModel",
    "OVSProcessor",
    "OpenVocabularySegmentationPipeline",
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
