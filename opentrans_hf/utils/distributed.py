"""Accelerate helpers: several processes on machines without GPUs; main-process work whose outcome
every process shares."""

from __future__ import annotations

import os

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, broadcast_object_list, gather_object


def cpu_only_multiprocess() -> bool:
    """True when this process is one of several (``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun``) on a machine without CUDA: Accelerate must then be told ``cpu=True`` to run DDP on CPU
    with gloo (otherwise every process silently trains alone). ``accelerate launch --cpu`` starts only
    one process (several need mpirun), so the torchrun launcher plus this is the way to test DDP on CPU."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(**kwargs):
    """``Accelerator(**kwargs)``, with ``cpu=True`` added when :func:`cpu_only_multiprocess`; stops first when
    the launch started fewer processes than it asked for (:func:`check_launch`)."""
    check_launch()
    if cpu_only_multiprocess():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def make_state() -> PartialState:
    """``PartialState`` for the jobs that coordinate processes without training (``cpu=True`` when
    :func:`cpu_only_multiprocess`), after the same :func:`check_launch`."""
    check_launch()
    return PartialState(cpu=cpu_only_multiprocess())


def requested_processes(launcher_argv: list[str]) -> int | None:
    """The ``--num_processes`` an ``accelerate launch`` command line asked for (its own flags, not the
    script's); None when ``launcher_argv`` is not ``accelerate launch`` or names no count."""
    argv = list(launcher_argv)
    for i, token in enumerate(argv):
        if token == "launch" and i > 0 and os.path.basename(argv[i - 1]).startswith("accelerate"):
            rest = argv[i + 1:]
            break
        if token == "accelerate.commands.launch":
            rest = argv[i + 1:]
            break
    else:
        return None
    for i, token in enumerate(rest):
        if not token.startswith("-"):  # the training script: what follows is its own arguments
            return None
        if token.startswith("--num_processes=") or token.startswith("--num-processes="):
            return int(token.split("=", 1)[1])
        if token in ("--num_processes", "--num-processes") and i + 1 < len(rest):
            return int(rest[i + 1])
    return None


def check_launch() -> None:
    """Stop with one line when this process was started by ``accelerate launch --num_processes N`` (N > 1)
    but runs alone: without ``--multi_gpu`` (or a multi-process config) Accelerate starts a single process on
    a machine without GPUs and says nothing, so the job would train alone and report one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    try:
        asked = requested_processes(psutil.Process(os.getppid()).cmdline())
    except (psutil.Error, OSError, ValueError):  # no parent to read, or not ours to read: nothing to check
        return
    if asked is not None and asked > 1:
        raise ValueError(
            f"accelerate launch asked for {asked} processes but started this one alone (Accelerate's simple "
            "launcher runs one process): add --multi_gpu to run them (without GPUs they run on the CPU with "
            "gloo), or pass --num_processes 1")


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


def on_every_process(state, fn):
    """Run ``fn()`` on every process and share the outcomes: every process returns its own result, or every
    process raises (its own error, or, where it succeeded, which process failed and why), so no process goes
    on to a barrier that a failed one will never reach. ``state``: an ``Accelerator``, a ``PartialState`` or
    None. A collective: every process must call it."""
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others have heard of it
        error = err
    if state is not None and state.num_processes > 1:
        messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if error is None and failed:
            rank, message = failed[0]
            raise RuntimeError(f"process {rank} failed: {message}")
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
