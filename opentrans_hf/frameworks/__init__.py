"""Open-vocabulary segmentation frameworks on HF CLIP that sparse masks and spectral tuning transfer to."""

from .backbone import PYRAMID_SCALES, SimpleFeaturePyramid, vit_feature_maps
from .classifier import OpenVocabClassifier
from .configuration import CLIPDeepLabV3Config, CLIPFCCLIPConfig, CLIPMask2FormerConfig, OVSConfig
from .deeplabv3 import CLIPDeepLabV3ForOVS
from .fcclip import CLIPFCCLIPForOVS, geometric_ensemble
from .mask2former import CLIPMask2FormerForOVS
from .modeling_base import ENCODER_TARGET_MODULES, OVSPreTrainedModel, OVSSegmentationOutput
from .zeroshot import CLIPDenseZeroShot

FRAMEWORKS = {
    "deeplabv3": CLIPDeepLabV3ForOVS,
    "mask2former": CLIPMask2FormerForOVS,
    "fcclip": CLIPFCCLIPForOVS,
}

__all__ = [
    "CLIPDeepLabV3Config",
    "CLIPDenseZeroShot",
    "CLIPDeepLabV3ForOVS",
    "CLIPFCCLIPConfig",
    "CLIPFCCLIPForOVS",
    "CLIPMask2FormerConfig",
    "CLIPMask2FormerForOVS",
    "ENCODER_TARGET_MODULES",
    "FRAMEWORKS",
    "OVSConfig",
    "OVSPreTrainedModel",
    "OVSSegmentationOutput",
    "OpenVocabClassifier",
    "PYRAMID_SCALES",
    "SimpleFeaturePyramid",
    "geometric_ensemble",
    "vit_feature_maps",
]


def _register_auto_classes() -> None:
    """``AutoConfig``/``AutoModel`` know the frameworks once ``opentrans_hf.frameworks`` is imported."""
    from transformers import AutoConfig, AutoModel

    for cls in FRAMEWORKS.values():
        model_type = cls.config_class.model_type
        try:
            AutoConfig.register(model_type, cls.config_class)
            AutoModel.register(cls.config_class, cls)
        except ValueError:  # already registered (module re-imported)
            pass


_register_auto_classes()
