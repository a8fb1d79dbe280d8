"""Non-finite numbers stop training instead of becoming a model: checks of the loss, the gradients and the
weights, agreed on by every process (one rank's NaN stops them all, at the same step, without a hang)."""

from __future__ import annotations

import torch
from accelerate.utils import gather_object
from torch.distributed.tensor import DTensor


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight became non-finite."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard under FSDP2 (a DTensor), else ``t`` (the checks are agreed on
    by every process afterwards, so each one looks at its own shard)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _all_finite(tensors) -> torch.Tensor:
    flags = [torch.isfinite(_local(t)).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def _bad_value(t: torch.Tensor) -> str:
    """The first non-finite value of ``t`` (``nan``, ``inf`` or ``-inf``)."""
    t = _local(t).detach()
    bad = t[~torch.isfinite(t)]
    return str(bad.flatten()[0].item()) if bad.numel() else "finite"


def first_non_finite(named_tensors) -> tuple[str, str] | None:
    """``(name, value)`` of the first tensor with a non-finite value, or None."""
    for name, t in named_tensors:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(_local(t)).all()):
            return name, _bad_value(t)
    return None


def check_finite_weights(model: torch.nn.Module, what: str = "the model") -> None:
    """Raise ``ValueError`` naming the first parameter (or buffer) of ``model`` with a NaN or infinite value."""
    with torch.no_grad():
        bad = first_non_finite(list(model.named_parameters()) + list(model.named_buffers()))
    if bad is not None:
        raise ValueError(f"{what} has non-finite weights: parameter {bad[0]} holds {bad[1]} (a diverged training "
                         f"run?); refusing to use it")


def _agree(accelerator, local_problem: str | None) -> str | None:
    """The first process's problem, the same on every process (a collective: every process calls it)."""
    flag = torch.tensor([0.0 if local_problem is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() == 0:
        return None
    if accelerator.num_processes == 1:
        return local_problem
    problems = gather_object([local_problem])
    rank, problem = next((r, p) for r, p in enumerate(problems) if p is not None)
    return f"{problem} (on process {rank})"


def step_problem(accelerator, losses: torch.Tensor, named_params, check_grads: bool = True) -> str | None:
    """Before the optimizer step: what is non-finite among this step's micro-batch ``losses`` and the
    gradients of ``named_params`` (``(name, parameter)`` pairs), agreed on by every process; None if all is
    finite. ``check_grads=False`` under fp16 loss scaling (its scaler skips steps with overflowing
    gradients by design)."""
    losses = losses.detach().float().flatten()
    named_params = list(named_params)
    ok = bool(_all_finite([losses] + ([p.grad for _, p in named_params if p.grad is not None] if check_grads else [])))
    local = None
    if not ok:
        if not bool(torch.isfinite(losses).all()):
            local = f"the loss is {_bad_value(losses)}"
        else:
            name, value = first_non_finite((n, p.grad) for n, p in named_params)
            local = f"the gradient of {name} holds {value}"
    return _agree(accelerator, local)


def weights_problem(accelerator, named_params) -> str | None:
    """After the optimizer step: the first parameter of ``named_params`` with a non-finite value (agreed
    on by every process), or None."""
    named_params = list(named_params)
    local = None
    if not bool(_all_finite([p.detach() for _, p in named_params])):
        name, value = first_non_finite((n, p.detach()) for n, p in named_params)
        local = f"the weight {name} holds {value} after the optimizer step"
    return _agree(accelerator, local)
