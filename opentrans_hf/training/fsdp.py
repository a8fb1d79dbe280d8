"""The training loop under FSDP: what a sharded model needs before ``accelerator.prepare``, its gradient
and state-dict collectives, and the plain copy it is evaluated with.

Under FSDP every process holds only a shard of each weight, and every forward gathers the shards of the
layers it runs: all processes must run the same forwards in the same order. Evaluation shards the
*examples* over the processes (and the sliding-window protocol runs a different number of windows per
image), so it cannot run the sharded model; it runs a plain copy of the model, made on every process
from the gathered full state dict, which gives exactly the numbers of a single-process load of the
saved model.
"""

from __future__ import annotations

import re

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from opentrans_hf.utils import logging

logger = logging.get_logger(__name__)

SPECTRAL_PREFIX = "base_model."
"""The prefix of a spectral-tuning wrapper's state-dict keys (its ``base_model`` submodule)."""


def is_sharded(accelerator) -> bool:
    """Whether ``accelerator`` shards the model (FSDP1 or FSDP2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def is_fsdp2(accelerator) -> bool:
    return is_sharded(accelerator) and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2


def keep_scalars_whole(accelerator, model: nn.Module) -> list[nn.Parameter]:
    """Before ``accelerator.prepare`` under FSDP2: keep ``model``'s 0-dim parameters out of the sharding.

    ``fully_shard`` refuses scalar parameters (CLIP's ``logit_scale`` and the classifier's), so they go in
    FSDP2's ignored parameters: every process holds them whole, and FSDP neither shards them nor reduces
    their gradients. Returns the trainable ones, whose gradients :func:`average_whole_gradients` averages
    over the processes at each optimizer step (otherwise each process would train its own copy)."""
    scalars = [p for p in model.parameters() if p.dim() == 0]
    if not scalars or not is_fsdp2(accelerator):
        return []
    holder = nn.Module()  # Accelerate takes FSDP2's ignored parameters as the parameters of "ignored modules"
    for i, p in enumerate(scalars):
        holder.register_parameter(f"scalar_{i}", p)
    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading:  # moves the model to "meta" on all but one process: new parameter objects
        logger.warning("fsdp_cpu_ram_efficient_loading is turned off: FSDP2 keeps the model's scalar parameters "
                       "(logit scales) out of the sharding, which needs their parameters as they are")
        plugin.cpu_ram_efficient_loading = False
    ignored = plugin.ignored_modules
    if isinstance(ignored, str):  # the launcher's regex of module names (fsdp_ignored_modules)
        pattern = re.compile(ignored)
        ignored = [m for n, m in model.named_modules() if pattern.fullmatch(n)]
    plugin.ignored_modules = [*(ignored or []), holder]
    return [p for p in scalars if p.requires_grad]


def average_whole_gradients(accelerator, params: list[nn.Parameter]) -> None:
    """Average the gradients of the unsharded trainable ``params`` (:func:`keep_scalars_whole`) over the
    processes, in place (a collective: every process calls it, with the same parameters)."""
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        averaged = accelerator.reduce(grad.detach(), reduction="mean")
        if p.grad is None:
            p.grad = averaged
        else:
            p.grad.copy_(averaged)


def gathered_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of the prepared ``model`` on the main process (None on the others), on CPU,
    under its unwrapped names: Accelerate's ``get_state_dict`` (under FSDP the shards are gathered; a
    collective). Without FSDP, None: the main process saves the module itself."""
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else None


def base_state_dict(state: dict[str, torch.Tensor], spectral) -> dict[str, torch.Tensor]:
    """``state`` (the prepared model's) under the names of the model that is saved: a spectral tuning
    wrapper's ``base_model.`` prefix removed."""
    if spectral is None:
        return state
    return {k.removeprefix(SPECTRAL_PREFIX): v for k, v in state.items()}


def plain_class(module: nn.Module) -> type:
    """The class of ``module`` before FSDP2 made it a sharded module (``fully_shard`` swaps the class for a
    subclass of it and of ``FSDPModule``)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def plain_copy(accelerator, model: nn.Module, spectral, mask) -> nn.Module:
    """A plain, unsharded copy of the prepared ``model`` on every process (a collective), on
    ``accelerator.device``: the framework without spectral tuning's wrapper (whose forward is the
    framework's), its weights the gathered full state dict, ``mask`` applied. In eval mode."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    framework = spectral.base_model if spectral is not None else accelerator.unwrap_model(model)
    copy = plain_class(framework)(framework.config, tokenizer=framework.tokenizer,
                                  image_processor=framework.get_image_processor())
    state = {k: v.to(accelerator.device) for k, v in base_state_dict(state, spectral).items()}
    copy.load_state_dict(state, strict=True, assign=True)
    copy.to(accelerator.device)
    if mask is not None:
        mask.apply(copy, strict=True)
    return copy.eval()
