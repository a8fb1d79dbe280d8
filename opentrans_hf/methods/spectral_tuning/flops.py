"""Training FLOPs with and without spectral freezing, counted on a real step.

The forward and backward of one training step run under ``torch.utils.flop_counter.FlopCounterMode``
twice: once with every parameter trainable (full fine-tuning) and once with the model's current
``requires_grad`` (the freezing). Autograd itself then leaves out what freezing saves: a frozen layer
needs no weight gradient, and below the lowest trainable layer (in the order the forward runs) no
gradient flows at all, because nothing there requires it. Counted: the matrix-multiply-like ops
(linear, matmul, bmm, convolution, attention -- the CPU attention kernel included, see
opentrans_hf.utils.flops); element-wise ops are not (they are a small share).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from opentrans_hf.methods.spectral_tuning.training_utils import _loss_of
from opentrans_hf.utils.flops import flop_counter


def _count_step(model, inputs, loss_fn) -> tuple[int, int]:
    with flop_counter() as fwd:
        out = model(**inputs)
        loss = loss_fn(out) if loss_fn is not None else _loss_of(out)
    with flop_counter() as bwd:
        if loss.requires_grad:
            loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def estimate_training_flops(model: nn.Module, inputs: dict, loss_fn: Callable | None = None) -> dict:
    """FLOPs of one training step on ``inputs`` (a batch of keyword arguments for ``model``).

    Returns ``{"full": {...}, "tuned": {...}, "saving": fraction}`` where each entry holds
    ``forward``, ``backward`` and ``total`` FLOPs: ``full`` with all parameters trainable, ``tuned``
    with the model's current ``requires_grad`` (e.g. after :func:`get_spectral_model`). Multiply by
    the number of steps for a run's training FLOPs (the paper's "training FLOPs" column). Weights and
    ``requires_grad`` are left as they were; gradients are restored.
    """
    params = list(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params}
    grads = {n: p.grad for n, p in params}
    was_training = model.training
    result = {}
    try:
        for name, setting in (("full", True), ("tuned", None)):
            for n, p in params:
                p.requires_grad_(flags[n] if setting is None else setting)
                p.grad = None
            f, b = _count_step(model, inputs, loss_fn)
            result[name] = {"forward": f, "backward": b, "total": f + b}
    finally:
        for n, p in params:
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)
    result["saving"] = 1 - result["tuned"]["total"] / result["full"]["total"] if result["full"]["total"] else 0.0
    return result
