"""Small helpers on ``torch.nn.Module`` state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` the module in eval mode inside, its previous train/eval mode restored after
    (also when the body raises)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
