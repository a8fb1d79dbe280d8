"""Spectral tuning after a warm-up, the OpenTrans paper's protocol (its Figure 4): fine-tune every target
layer for ``spectral_warmup_steps`` optimizer steps, then measure alpha on the trained weights, freeze the
layers the rule picks and continue with a new optimizer and a new distributed wrapper (DDP needs the final
``requires_grad`` at wrap time).

During the warm-up the model trains what the run trains without spectral tuning (the framework's trainable
parameters: the encoder layers its heads read, the heads) plus the config's ``modules_to_save``; at the
switch only the rule's layers are frozen. Alpha is measured on the main process and broadcast, so every
process freezes the same layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from accelerate.utils import broadcast_object_list

from opentrans_hf.methods.spectral_tuning import SpectralTuningConfig, get_spectral_model
from opentrans_hf.utils.distributed import on_main_process
from opentrans_hf.utils.io import read_json
from opentrans_hf.utils.matching import name_matches

# the switch re-wraps the model with accelerator.prepare: a plain module or DDP only (FSDP's flat parameters
# and DeepSpeed's engine are built once per run)
UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


def check_switch_supported(accelerator) -> None:
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in UNSUPPORTED:
        raise ValueError(f"--spectral_warmup_steps re-wraps the model after the warm-up, which {kind} does not "
                         "support: use DDP (or one process), or measure alpha on the starting weights "
                         "(--spectral_warmup_steps 0)")


def spectral_config_of(args, model):
    """The ``SpectralTuningConfig`` the run's arguments ask for (``--spectral_config``: a JSON file, an
    adapter directory or a Hub id; or ``--freeze_rule`` on the framework's encoder layers), or None."""
    if args.spectral_config:
        p = Path(args.spectral_config)
        if p.is_file():
            return SpectralTuningConfig.from_dict(read_json(p, "spectral tuning config"), where=f"{p}: ")
        return SpectralTuningConfig.from_pretrained(args.spectral_config)
    if args.freeze_rule:
        # the seed also draws the layers of the "random" rule (the paper's Random baseline)
        return SpectralTuningConfig(freeze_rule=args.freeze_rule, seed=args.seed,
                                    target_modules=model.encoder_target_modules())
    return None


def check_warmup_config(config, warmup_steps: int, where: str = "--spectral_config") -> None:
    """A warm-up measures alpha after it: a config that already has ``layer_alphas`` (a saved adapter)
    would be re-applied as it is, so the two together are an error."""
    if warmup_steps and config is not None and config.layer_alphas is not None:
        raise ValueError(f"--spectral_warmup_steps {warmup_steps} measures alpha after the warm-up, but {where} "
                         f"already has layer_alphas ({len(config.layer_alphas)} layers): give a config without "
                         f"layer_alphas (or --freeze_rule), or drop --spectral_warmup_steps to re-apply it")


def prepare_warmup(model, config) -> None:
    """Make ``config.modules_to_save`` trainable for the warm-up (as they will be after the switch)."""
    if config.modules_to_save:
        for name, module in model.named_modules():
            if name_matches(name, config.modules_to_save):
                module.requires_grad_(True)


def apply_after_warmup(accelerator, model, config):
    """Measure alpha on the (unwrapped) ``model`` now, on the main process, and apply ``config`` on every
    process with the same alphas and trainable layers -> the :class:`~opentrans_hf.methods.spectral_tuning.SpectralModel`.
    ``config`` itself is not changed. A collective: every process calls it."""
    config = dataclasses.replace(config)
    if accelerator.num_processes == 1:
        return get_spectral_model(model, config)
    measured = on_main_process(accelerator, lambda: get_spectral_model(model, config))
    box = [config.to_dict() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    if measured is not None:
        return measured
    return get_spectral_model(model, SpectralTuningConfig.from_dict(box[0], where="the main process's config: "))


def switch_to_spectral_tuning(accelerator, model, optimizer, scheduler, config, make_optimizer, make_scheduler):
    """At the end of the warm-up (between two optimizer steps): apply ``config`` with alpha measured on the
    current weights, then rebuild the optimizer (AdamW's moments of the parameters that still train carry
    over, the learning rate goes on where it was) and the scheduler (same position) and wrap the model
    again with ``accelerator.prepare``. Returns ``(model, optimizer, scheduler, spectral)``, prepared."""
    accelerator.wait_for_everyone()
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    spectral = apply_after_warmup(accelerator, plain, config)

    old_opt = getattr(optimizer, "optimizer", optimizer)
    old_sched = getattr(scheduler, "scheduler", scheduler)
    new_opt = make_optimizer(spectral)
    for p in (p for g in new_opt.param_groups for p in g["params"]):
        if p in old_opt.state:
            new_opt.state[p] = old_opt.state[p]
    new_sched = make_scheduler(new_opt)
    new_sched.load_state_dict(old_sched.state_dict())
    for new_group, old_group in zip(new_opt.param_groups, old_opt.param_groups):
        new_group["lr"] = old_group["lr"]
    # Accelerate keeps what it prepared for save_state/load_state (the wrapper or, for DDP on CPU, the
    # plain model): the old model, optimizer and scheduler go, so a checkpoint holds exactly one of each
    # (as a run resumed after the switch prepares)
    for kept, old in ((accelerator._models, (model, plain)), (accelerator._optimizers, (optimizer, old_opt)),
                      (accelerator._schedulers, (scheduler, old_sched))):
        kept[:] = [o for o in kept if not any(o is x for x in old)]
    del model, optimizer, scheduler
    model, optimizer, scheduler = accelerator.prepare(spectral, new_opt, new_sched)
    return model, optimizer, scheduler, spectral


def frozen_by_rule(config) -> list[str]:
    """The ``layer_alphas`` entries whose layer ``config.trainable_layers`` does not train (names as the
    config writes them; a fused q/k/v part follows its module)."""
    trainable = set(config.trainable_layers or ())
    return [n for n in config.layer_alphas or {}
            if n not in trainable and not (n[-2:] in ("_q", "_k", "_v") and n[:-2] in trainable)]


def switch_record(spectral, step: int) -> dict:
    """What ``history.json``, ``metrics.json`` and the model card say about the switch (layer names as the
    adapter's config writes them)."""
    cfg = spectral.spectral_config
    return {"step": step, "freeze_rule": cfg.freeze_rule, "estimator": cfg.estimator,
            "layer_alphas": dict(cfg.layer_alphas), "frozen_layers": frozen_by_rule(cfg),
            "trainable_layers": list(cfg.trainable_layers)}
