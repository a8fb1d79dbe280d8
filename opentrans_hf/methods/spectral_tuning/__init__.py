"""Spectral tuning: fine-tune the light-tailed layers, freeze the well-trained ones (PEFT-style)."""

from opentrans_hf.methods.spectral_tuning.config import SpectralTuningConfig
from opentrans_hf.methods.spectral_tuning.flops import estimate_training_flops
from opentrans_hf.methods.spectral_tuning.model import (
    SpectralModel,
    get_spectral_model,
    read_spectral_adapter,
    select_trainable_layers,
)
from opentrans_hf.methods.spectral_tuning.selection import block_of, frozen_units
from opentrans_hf.methods.spectral_tuning.training_utils import (
    find_unused_parameters,
    freeze_unused_parameters,
    spectral_param_groups,
)

__all__ = [
    "SpectralModel",
    "SpectralTuningConfig",
    "block_of",
    "estimate_training_flops",
    "find_unused_parameters",
    "freeze_unused_parameters",
    "frozen_units",
    "get_spectral_model",
    "read_spectral_adapter",
    "select_trainable_layers",
    "spectral_param_groups",
]
