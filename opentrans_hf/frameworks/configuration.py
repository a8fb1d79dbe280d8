"""Deprecated: the configurations moved to :mod:`opentrans_hf.models` (``configuration_ovs`` and one
``configuration_<name>`` per framework) in 0.2; this module goes in 0.3."""

from opentrans_hf.utils.deprecation import warn_moved

warn_moved(__name__, "opentrans_hf.models")

from opentrans_hf.models.configuration_ovs import *  # noqa: E402,F403
from opentrans_hf.models.configuration_ovs import _saved_default  # noqa: E402,F401
from opentrans_hf.models.deeplabv3.configuration_deeplabv3 import CLIPDeepLabV3Config  # noqa: E402,F401
from opentrans_hf.models.fcclip.configuration_fcclip import CLASS_HEADS, MASK_POOLINGS, CLIPFCCLIPConfig  # noqa: E402,F401
from opentrans_hf.models.mask2former.configuration_mask2former import (  # noqa: E402,F401
    MASK_LOSS_IGNORED,
    CLIPMask2FormerConfig,
)
