"""Transferable sparsity: semantic-agnostic pruning of the CLIP image encoder, stored as mask adapters."""

from .magnitude import magnitude_prune, prunable_layers
from .mask import SparseMask, canonical_name

__all__ = ["SparseMask", "canonical_name", "magnitude_prune", "prunable_layers"]
