"""Mask2Former-style open-vocabulary segmentation on a CLIP image encoder."""

from opentrans_hf.models.mask2former.configuration_mask2former import CLIPMask2FormerConfig
from opentrans_hf.models.mask2former.modeling_mask2former import CLIPMask2FormerForOVS

__all__ = ["CLIPMask2FormerConfig", "CLIPMask2FormerForOVS"]
