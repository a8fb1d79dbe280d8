"""FC-CLIP-style open-vocabulary segmentation: the Mask2Former variant plus the frozen CLIP's
out-of-vocabulary branch and the geometric ensemble."""

from opentrans_hf.models.fcclip.configuration_fcclip import CLIPFCCLIPConfig
from opentrans_hf.models.fcclip.modeling_fcclip import CLIPFCCLIPForOVS, geometric_ensemble

__all__ = ["CLIPFCCLIPConfig", "CLIPFCCLIPForOVS", "geometric_ensemble"]
