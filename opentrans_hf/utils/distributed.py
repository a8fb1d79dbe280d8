"""Accelerate helpers: several processes on machines without GPUs; main-process work whose outcome
every process shares."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, broadcast_object_list


def cpu_only_multiprocess() -> bool:
    """True when this process is one of several (``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun``) on a machine without CUDA: Accelerate must then be told ``cpu=True`` to run DDP on CPU
    with gloo (otherwise every process silently trains alone). ``accelerate launch --cpu`` starts only
    one process (several need mpirun), so the torchrun launcher plus this is the way to test DDP on CPU."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(**kwargs):
    """``Accelerator(**kwargs)``, with ``cpu=True`` added when :func:`cpu_only_multiprocess`."""
    if cpu_only_multiprocess():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def on_main_process(state, fn):
    """Run ``fn()`` on the main process only and share its outcome: every process returns (the main one
    with ``fn``'s result, the others with None) or every process raises, so no process is left waiting
    at a barrier for a main process that failed. ``state``: an ``Accelerator``, a ``PartialState`` or
    None (a single process). A collective: every process must call it."""
    result, error = None, None
    if state is None or state.is_main_process:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = err
    if state is not None and state.num_processes > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        broadcast_object_list(message, from_process=0)
        if error is None and message[0] is not None:
            raise RuntimeError(f"the main process failed: {message[0]}")
    if error is not None:
        raise error
    return result


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``distributed_type: FSDP`` in an ``accelerate launch`` config,
    or ``--use_fsdp``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp2_on_cpu(accelerator) -> bool:
    """Make an FSDP launch on a machine without GPUs shard for real; returns whether it did.

    Accelerate turns FSDP on only for accelerator devices: on CPU (``use_cpu: true``, or no CUDA) an FSDP
    config silently becomes gloo DDP. FSDP2 (``fully_shard``) itself runs on CPU with gloo, so with
    ``fsdp_version: 2`` this switches the accelerator to FSDP with the launcher's FSDP settings (what
    ``configs/accelerate/fsdp_cpu_2proc.yaml`` and the tests rely on). FSDP1 cannot run on CPU (torch:
    "FSDP needs a non-CPU accelerator device"): a ValueError says so instead of training unsharded."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP with fsdp_version {plugin.fsdp_version} needs GPUs; on CPU only FSDP2 runs: set "
                         "fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp_cpu_2proc.yaml)")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True
