"""Inference kernels for a pruned model: ``SparseMask.export(model, "csr" | "2:4")``.

* ``"csr"`` (CPU): every masked ``nn.Linear`` whose sparsity reaches ``min_sparsity`` becomes a
  :class:`SparseLinear`, its weight a CSR matrix with int32 indices, computed as
  ``torch.addmm(bias[:, None], W_csr, x.T).T`` over blocks of 256 tokens (MKL's sparse x dense
  product; ``F.linear`` with a CSR weight takes a slower path). Measured on 2 CPU cores, ViT-B/16 layer
  shapes: a layer pays from about 85% sparsity at batch 1 (197 tokens), and at 90% the whole tower runs
  about 1.45x faster at batch 1 and 1.1-1.2x at batch 8; below about 80% CSR is slower than the dense
  product, hence the default ``min_sparsity=0.85`` (layers under it stay dense, masked weights zeroed).
* ``"2:4"`` (CUDA, compute capability >= 8.0, float16/bfloat16 weights): the masked weights, which must
  follow the 2:4 pattern (``magnitude_prune(..., scope="2:4")``), become
  ``torch.sparse.to_sparse_semi_structured`` parameters (PyTorch's own ``F.linear`` dispatch). Elsewhere
  (CPU, older GPUs, float32) the layers stay masked dense with a warning, or ``fallback=False`` raises.
  This path is untested here: no GPU was available where it was written.

Both are inference-only: an exported layer refuses to run where a gradient would flow through it
(grad mode on and an input or weight that requires grad); run it under ``torch.inference_mode()`` or
``torch.no_grad()``. To fine-tune, keep the mask applied to the dense model and export afterwards; to
store a pruned model compactly, use :func:`opentrans_hf.methods.sparse_mask.storage.save_sparse_pretrained` on the
masked (not exported) model.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from opentrans_hf.methods.sparse_mask.layer import _BUFFER

if TYPE_CHECKING:
    from opentrans_hf.methods.sparse_mask.mask import SparseMask
from opentrans_hf.methods.sparse_mask.semistructured import is_two_four

FORMATS = ("csr", "2:4")
CSR_DTYPES = (torch.float32, torch.float64)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_MIN_SPARSITY = 0.85

CSR_BETA_WARNING = "Sparse CSR tensor support is in beta state"
_csr_beta_warning_passed = False


def sparse_csr_tensor(*args, **kwargs) -> torch.Tensor:
    """``torch.sparse_csr_tensor(*args, **kwargs)`` without PyTorch's "Sparse CSR tensor support is in beta
    state" UserWarning (the products used here are tested). PyTorch gives that warning once per process, at
    the first CSR tensor, so only the first call here filters it (within ``warnings.catch_warnings``: the
    process's warning filters are left as they were); catching warnings around every forward would also
    reset Python's once-per-place warning registry each time."""
    global _csr_beta_warning_passed
    if _csr_beta_warning_passed:
        return torch.sparse_csr_tensor(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CSR_BETA_WARNING, category=UserWarning)
        tensor = torch.sparse_csr_tensor(*args, **kwargs)
    _csr_beta_warning_passed = True
    return tensor


class SparseLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is a CSR matrix (int32 indices), on CPU.

    The CSR parts are buffers (``crow_indices``, ``col_indices``, ``values``), so ``.to()``,
    ``deepcopy`` and ``state_dict`` carry them; the CSR tensor is assembled (no copy) at each forward.
    Inputs of any leading shape ``(..., in_features)``; the output is ``(..., out_features)``.

    The tokens go through in blocks of ``chunk_tokens`` (256): MKL's sparse x dense product slows down
    once the dense operand outgrows the cache (ViT-B/16, 90%, 2 cores, batch 8 = 1576 tokens: 1.1-1.2x
    the dense model in blocks, 0.8-0.9x in one product)."""

    chunk_tokens: int = 256

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: torch.Tensor | None = None) -> SparseLinear:
        """The CSR form of ``linear``'s weight at the positions ``keep`` (bool, the weight's shape) kept;
        default: its nonzero weights."""
        weight = linear.weight.detach()
        if keep is None:
            keep = weight != 0
        keep = keep.to(weight.device, torch.bool)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: CSR's order
        counts = torch.bincount(rows, minlength=weight.shape[0])
        crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = torch.cumsum(counts, 0)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(crow, cols.to(torch.int32), weight[rows, cols].clone(), linear.in_features, linear.out_features,
                   bias)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    def weight_csr(self) -> torch.Tensor:
        return sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                 (self.out_features, self.in_features), check_invariants=False)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` dense weight (zeros where pruned)."""
        return self.weight_csr().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"{type(self).__name__} (a layer exported by SparseMask.export(model, 'csr')) is inference-only and "
                "an input requiring grad reached it: run the model under torch.inference_mode() or torch.no_grad(). "
                "To train, keep the mask applied to the dense model (SparseMask.apply) and export afterwards.")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (..., {self.in_features}), got "
                             f"{tuple(x.shape)}")
        x2d = x.reshape(-1, self.in_features)
        w, n, step = self.weight_csr(), x2d.shape[0], max(int(self.chunk_tokens), 1)
        bias = None if self.bias is None else self.bias[:, None]
        if n <= step:
            out = torch.mm(w, x2d.T) if bias is None else torch.addmm(bias, w, x2d.T)
        else:
            out = torch.empty(self.out_features, n, dtype=self.values.dtype, device=x.device)
            for s in range(0, n, step):
                if bias is None:
                    torch.mm(w, x2d[s : s + step].T, out=out[:, s : s + step])
                else:
                    torch.addmm(bias, w, x2d[s : s + step].T, out=out[:, s : s + step])
        return out.T.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, format=csr")


def export_model(mask: SparseMask, model: nn.Module, format: str = "csr", *, min_sparsity: float = DEFAULT_MIN_SPARSITY,
                 fallback: bool = True, strict: bool = True) -> dict[str, str]:
    """``mask.export(model, format)``: swap ``model``'s masked Linear layers for inference kernels, in place.

    Returns ``{module name: how it is now stored}``, one entry per masked module: ``"csr"`` /
    ``"2:4"`` (exported) or ``"dense"`` (stayed an ordinary layer, its masked weights zeroed: a CSR
    layer under ``min_sparsity``, a masked Conv, or a 2:4 layer on a device without 2:4 kernels).
    The model computes what the masked dense model computes (up to float rounding), for inference only.

    * ``format="csr"``: weights must be float32/float64 on CPU. ``min_sparsity`` (default 0.85,
      measured break-even on 2 CPU cores): layers pruned less than that stay dense.
    * ``format="2:4"``: needs CUDA with compute capability >= 8.0 and float16/bfloat16 weights; a mask
      that is not 2:4 (at most 2 kept of every 4 consecutive weights per row) is an error naming the
      layer. Without such a device/dtype the layers stay masked dense with a ``UserWarning``
      (``fallback=True``) or a ``RuntimeError`` is raised (``fallback=False``). Untested here (no GPU).

    ``strict``: as :meth:`SparseMask.resolve` (every mask entry must match a parameter of ``model``).
    A mask already applied to a layer (``SparseMask.apply``) is combined with ``mask`` (AND).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {FORMATS}")
    if not (isinstance(min_sparsity, (int, float)) and not isinstance(min_sparsity, bool) and 0.0 <= min_sparsity <= 1.0):
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    plan = _export_plan(mask, model, format, strict)
    reason = _two_four_unsupported(plan, fallback) if format == "2:4" else None
    report = {}
    for mod_name, module, pname, linear, keep in plan:
        param = getattr(module, pname)
        sparsity = 1.0 - int(torch.count_nonzero(keep)) / max(keep.numel(), 1)
        if linear and format == "csr" and sparsity >= min_sparsity:
            _swap(model, mod_name, SparseLinear.from_linear(module, keep))
            report[mod_name] = "csr"
        elif linear and format == "2:4" and reason is None:
            report[mod_name] = _to_semi_structured(module, keep, fallback)
        else:
            with torch.no_grad():
                param.mul_(keep)
            report[mod_name] = "dense"
    return report


def _export_plan(mask: SparseMask, model: nn.Module, format: str, strict: bool) -> list[tuple]:
    """``(module name, module, parameter name, is a Linear weight, keep)`` of every masked parameter, its
    keep mask combined with one already applied: every layer checked for ``format`` before any change."""
    found, _ = mask.resolve(model, strict=strict)
    modules = dict(model.named_modules())
    plan = []
    for name, target in found.items():
        mod_name, _, pname = target.rpartition(".")
        module = modules[mod_name]
        param = getattr(module, pname)
        keep = mask.masks[name].to(param.device)
        applied = getattr(module, _BUFFER.format(pname), None)
        if applied is not None:
            keep = keep & applied.to(param.device)
        linear = isinstance(module, nn.Linear) and pname == "weight"
        if linear and not mod_name:
            raise ValueError(f"export swaps layers inside a model; {type(model).__name__} is itself the masked "
                             "Linear: wrap it in a module")
        if linear and format == "csr" and (param.device.type != "cpu" or param.dtype not in CSR_DTYPES):
            raise ValueError(f"CSR export runs on CPU with float32/float64 weights; {mod_name}.weight is "
                             f"{param.dtype} on {param.device} (for GPUs see format='2:4')")
        if linear and format == "2:4" and not is_two_four(keep):
            raise ValueError(f"{mod_name}.weight's mask is not 2:4 (at most 2 kept weights in every 4 consecutive "
                             "ones of a row, in_features divisible by 4): make it with magnitude_prune(model, 0.5, "
                             "scope='2:4')")
        plan.append((mod_name, module, pname, linear, keep))
    return plan


def _two_four_unsupported(plan: list[tuple], fallback: bool) -> str | None:
    """Why the plan's Linear layers cannot run 2:4 kernels here (None: they can, or there are none): a
    ``RuntimeError`` without ``fallback``, else a warning (the layers then stay masked dense)."""
    weights = [getattr(m, p) for _, m, p, linear, _ in plan if linear]
    if not weights:
        return None
    reason = semi_structured_unsupported(weights[0])
    if reason is not None and not fallback:
        raise RuntimeError(f"cannot export to 2:4: {reason}; pass fallback=True to keep the layers masked dense")
    if reason is not None:  # stacklevel: this, export_model, SparseMask.export, its caller
        warnings.warn(f"2:4 export: {reason}; the masked layers stay dense (masked weights zeroed)", UserWarning,
                      stacklevel=4)
    return reason


def semi_structured_unsupported(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot become a 2:4 semi-structured tensor here, or None when it can."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"this PyTorch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    if weight.device.type != "cuda":
        return f"2:4 kernels need a CUDA device, the weights are on {weight.device}"
    capability = torch.cuda.get_device_capability(weight.device)
    if capability < (8, 0):
        return f"2:4 kernels need compute capability >= 8.0, {weight.device} has {capability[0]}.{capability[1]}"
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"2:4 kernels here take float16/bfloat16 weights, got {weight.dtype} (cast the model with .half() first)"
    return None


def _to_semi_structured(module: nn.Linear, keep: torch.Tensor, fallback: bool) -> str:
    """Replace ``module.weight`` by its 2:4 semi-structured form (untested here: no GPU)."""
    with torch.no_grad():
        module.weight.mul_(keep)
    try:
        sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach().contiguous())
    except RuntimeError as err:  # e.g. a shape under the kernels' minimum block
        if not fallback:
            raise RuntimeError(f"cannot export a Linear of weight shape {tuple(module.weight.shape)} to 2:4: {err}") from err
        warnings.warn(f"2:4 export: a Linear of weight shape {tuple(module.weight.shape)} stays dense ({err})",
                      UserWarning, stacklevel=4)
        return "dense"
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return "2:4"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
