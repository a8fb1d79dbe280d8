"""Deprecated alias of :mod:`opentrans_hf.methods.sparse_mask.magnitude` (moved in 0.2, removed in 0.3)."""

from opentrans_hf.utils.deprecation import alias_module

alias_module(__name__, "opentrans_hf.methods.sparse_mask.magnitude")
