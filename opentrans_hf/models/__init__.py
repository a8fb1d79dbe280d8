"""Open-vocabulary segmentation frameworks on HF CLIP that sparse masks and spectral tuning transfer to."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from opentrans_hf.models.backbone import PYRAMID_SCALES, SimpleFeaturePyramid, vit_feature_maps
from opentrans_hf.models.classifier import OpenVocabClassifier
from opentrans_hf.models.configuration_ovs import OVSConfig, SolverConfig
from opentrans_hf.models.deeplabv3.configuration_deeplabv3 import CLIPDeepLabV3Config
from opentrans_hf.models.deeplabv3.modeling_deeplabv3 import CLIPDeepLabV3ForOVS
from opentrans_hf.models.fcclip.configuration_fcclip import CLIPFCCLIPConfig
from opentrans_hf.models.fcclip.modeling_fcclip import CLIPFCCLIPForOVS, geometric_ensemble
from opentrans_hf.models.image_processing_ovs import OVSImageProcessor
from opentrans_hf.models.mask2former.configuration_mask2former import CLIPMask2FormerConfig
from opentrans_hf.models.mask2former.modeling_mask2former import CLIPMask2FormerForOVS
from opentrans_hf.models.modeling_ovs import ENCODER_TARGET_MODULES, OVSPreTrainedModel, OVSSegmentationOutput
from opentrans_hf.models.processing_ovs import OVSProcessor
from opentrans_hf.models.zeroshot import CLIPDenseZeroShot

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
    "OVSImageProcessor",
    "OVSPreTrainedModel",
    "OVSProcessor",
    "OVSSegmentationOutput",
    "OpenVocabClassifier",
    "PYRAMID_SCALES",
    "SimpleFeaturePyramid",
    "SolverConfig",
    "geometric_ensemble",
    "register_auto_classes",
    "vit_feature_maps",
]


def register_auto_classes() -> None:
    """Register every framework with ``AutoConfig``, ``AutoModel``, ``AutoImageProcessor`` (:class:`OVSImageProcessor`)
    and ``AutoProcessor`` (:class:`OVSProcessor`); ``import opentrans_hf`` does it. Idempotent."""
    for cls in FRAMEWORKS.values():
        config_class = cls.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, cls, exist_ok=True)
        try:  # transformers >= 5.x with image processor backends
            AutoImageProcessor.register(config_class, image_processor_classes={"pil": OVSImageProcessor}, exist_ok=True)
        except TypeError:
            AutoImageProcessor.register(config_class, slow_image_processor_class=OVSImageProcessor, exist_ok=True)
        AutoProcessor.register(config_class, OVSProcessor, exist_ok=True)
