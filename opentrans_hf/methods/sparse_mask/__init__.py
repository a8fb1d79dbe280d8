"""Transferable sparsity: semantic-agnostic pruning of the CLIP image encoder, stored as mask adapters."""

from opentrans_hf.methods.sparse_mask.compact import RemovedAttention, RemovedMLP, compact_model, shrink_to_structure
from opentrans_hf.methods.sparse_mask.counting import count_params_and_flops, vision_tower
from opentrans_hf.methods.sparse_mask.export import SparseLinear
from opentrans_hf.methods.sparse_mask.imp import IMPConfig, distillation_loss, iterative_magnitude_prune
from opentrans_hf.methods.sparse_mask.magnitude import magnitude_prune, prunable_layers
from opentrans_hf.methods.sparse_mask.mask import SparseMask, canonical_name
from opentrans_hf.methods.sparse_mask.semistructured import two_four_masks
from opentrans_hf.methods.sparse_mask.storage import load_sparse_mask, load_sparse_pretrained, save_sparse_pretrained

__all__ = [
    "IMPConfig",
    "RemovedAttention",
    "RemovedMLP",
    "SparseLinear",
    "SparseMask",
    "canonical_name",
    "compact_model",
    "count_params_and_flops",
    "distillation_loss",
    "iterative_magnitude_prune",
    "load_sparse_mask",
    "load_sparse_pretrained",
    "magnitude_prune",
    "prunable_layers",
    "save_sparse_pretrained",
    "shrink_to_structure",
    "two_four_masks",
    "vision_tower",
]
