"""Transferable sparsity: semantic-agnostic pruning of the CLIP image encoder, stored as mask adapters."""

from .compact import RemovedAttention, RemovedMLP, compact_model, shrink_to_structure
from .counting import count_params_and_flops, vision_tower
from .imp import IMPConfig, distillation_loss, iterative_magnitude_prune
from .magnitude import magnitude_prune, prunable_layers
from .mask import SparseMask, canonical_name

__all__ = [
    "IMPConfig",
    "RemovedAttention",
    "RemovedMLP",
    "SparseMask",
    "canonical_name",
    "compact_model",
    "count_params_and_flops",
    "distillation_loss",
    "iterative_magnitude_prune",
    "magnitude_prune",
    "prunable_layers",
    "shrink_to_structure",
    "vision_tower",
]
