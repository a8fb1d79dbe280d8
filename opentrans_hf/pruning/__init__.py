"""Deprecated alias of :mod:`opentrans_hf.methods.sparse_mask` (moved in 0.2, removed in 0.3); its submodules are
aliases too."""

from opentrans_hf.utils.deprecation import forward_package

__getattr__ = forward_package(__name__, "opentrans_hf.methods.sparse_mask")
