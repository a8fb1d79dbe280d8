"""Accelerate on machines without GPUs."""

from __future__ import annotations

import os


def cpu_only_multiprocess() -> bool:
    """True when this process is one of several (``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun``) on a machine without CUDA: Accelerate must then be told ``cpu=True`` to run DDP on CPU
    with gloo (otherwise every process silently trains alone). ``accelerate launch --cpu`` starts only
    one process (several need mpirun), so the torchrun launcher plus this is the way to test DDP on CPU."""
    import torch

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(**kwargs):
    """``Accelerator(**kwargs)``, with ``cpu=True`` added when :func:`cpu_only_multiprocess`."""
    from accelerate import Accelerator

    if cpu_only_multiprocess():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)
