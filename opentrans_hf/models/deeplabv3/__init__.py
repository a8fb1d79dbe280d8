"""DeepLabV3-style open-vocabulary segmentation on a CLIP image encoder."""

from opentrans_hf.models.deeplabv3.configuration_deeplabv3 import CLIPDeepLabV3Config
from opentrans_hf.models.deeplabv3.modeling_deeplabv3 import CLIPDeepLabV3ForOVS

__all__ = ["CLIPDeepLabV3Config", "CLIPDeepLabV3ForOVS"]
