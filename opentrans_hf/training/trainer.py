"""The Accelerate fine-tuning loop: an OVS framework on an HF segmentation dataset, with a transferred
sparse mask and spectral tuning, evaluated zero-shot on other datasets.

Runs under ``accelerate launch`` (any number of processes) and plain ``python``. ``args`` is the
``train`` job's arguments (``opentrans_hf.commands.train.TrainArguments``: ``scripts/train.py`` and
``opentrans-hf train`` parse it); this module only reads its fields.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import CLIPConfig

from opentrans_hf.data.assembly import load_training_data, make_loader
from opentrans_hf.methods.sparse_mask import SparseMask
from opentrans_hf.methods.spectral_tuning import SpectralTuningConfig, get_spectral_model
from opentrans_hf.models import FRAMEWORKS
from opentrans_hf.models.classifier import class_synonyms
from opentrans_hf.training.checkpoints import (
    SPECTRAL_KEY,
    check_fingerprint,
    find_checkpoint,
    kept_checkpoint,
    load_checkpoint_state,
    read_history,
    remove_partial_checkpoints,
    run_fingerprint,
    save_checkpoint,
)
from opentrans_hf.training.divergence import TrainingDiverged, step_problem, weights_problem
from opentrans_hf.training.evaluation import METRIC_UNITS, evaluate_splits, percent
from opentrans_hf.training.fsdp import (
    average_whole_gradients,
    gathered_state_dict,
    is_sharded,
    keep_scalars_whole,
    plain_copy,
)
from opentrans_hf.training.optim import make_optimizer as build_optimizer
from opentrans_hf.training.optim import make_scheduler as build_scheduler
from opentrans_hf.training.optim import resolve_solver
from opentrans_hf.training.outputs import IncompleteOutputs, write_model, write_outputs
from opentrans_hf.training.pretraining import default_clip
from opentrans_hf.training.tracking import (
    TRACKER_PROJECT,
    Throughput,
    eval_scalars,
    finish_trackers,
    hyperparameters,
    switch_scalars,
    trackers,
)
from opentrans_hf.training.warmup import (
    check_switch_supported,
    check_warmup_config,
    prepare_warmup,
    spectral_config_of,
    switch_record,
    switch_to_spectral_tuning,
)
from opentrans_hf.utils import logging
from opentrans_hf.utils.distributed import enable_fsdp2_on_cpu, make_accelerator, on_main_process
from opentrans_hf.utils.hub import push_folder_to_hub
from opentrans_hf.utils.io import WriteError
from opentrans_hf.utils.locking import output_dir_lock

logger = logging.get_logger(__name__)


def framework_class(name: str):
    return FRAMEWORKS[name]


def config_overrides(cls, overrides: str | None) -> dict:
    """``"key=value,key=value"`` -> the framework config settings it names, typed as the config's own
    (transformers' ``PretrainedConfig.update_from_string``); an unknown key or a value of the wrong type
    is a ValueError naming it."""
    if not overrides:
        return {}
    probe = cls.config_class()
    try:
        probe.update_from_string(overrides)
    except ValueError as err:
        raise ValueError(f"--config_overrides {overrides!r} for {cls.config_class.__name__}: {err}") from None
    return {kv.split("=", 1)[0]: getattr(probe, kv.split("=", 1)[0]) for kv in overrides.split(",")}


def build_model(args, clip_path: str, image_size: int, seen_classes: list[str], spectral_state: dict | None = None):
    """The framework around the CLIP, with the mask applied and spectral tuning set up (before
    ``accelerator.prepare``: DDP needs the final ``requires_grad`` at wrap time) ->
    ``(model, mask, spectral, pending)``.

    With ``args.spectral_warmup_steps`` spectral tuning waits for the end of the warm-up: ``spectral`` is
    None and ``pending`` the config to apply then; ``spectral_state`` (a checkpoint's record of a config
    applied at the switch) applies that config at once, without a new analysis."""
    cls = framework_class(args.framework)
    overrides = config_overrides(cls, getattr(args, "config_overrides", None))
    model = cls.from_clip(clip_path, image_size=image_size, seen_class_names=list(seen_classes), **overrides)
    mask = None
    if args.mask:
        mask = SparseMask.from_pretrained(args.mask)
        mask.apply(model, strict=True)
    spectral, pending = None, None
    if spectral_state is not None:
        cfg = SpectralTuningConfig.from_dict(spectral_state, where="the checkpoint's spectral config: ")
        spectral = get_spectral_model(model, cfg)
        return spectral, mask, spectral, None
    cfg = spectral_config_of(args, model)
    if cfg is not None and getattr(model.config, "freeze_clip_encoder", False):
        logger.warning(f"{args.framework} keeps its CLIP image encoder frozen (freeze_clip_encoder=True, FC-CLIP's "
                       "design), so spectral tuning trains none of its layers; --config_overrides "
                       "freeze_clip_encoder=false fine-tunes the encoder (FC-CLIP's out-of-vocabulary branch then "
                       "reads the tuned encoder)")
    if cfg is not None and args.spectral_warmup_steps:
        check_warmup_config(cfg, args.spectral_warmup_steps, f"--spectral_config {args.spectral_config}")
        prepare_warmup(model, cfg)
        pending = cfg
    elif cfg is not None:
        spectral = get_spectral_model(model, cfg)
        model = spectral
    return model, mask, spectral, pending


def run_training(args) -> dict:
    """Train, evaluate, write everything to ``args.output_dir``; returns the final metrics.

    Holds the output directory's lock for the whole run (one run per directory). A non-finite loss,
    gradient or weight stops it with :class:`~opentrans_hf.training.divergence.TrainingDiverged` (every
    process, at the same step) before anything of that step is written. The model directory is written
    before the final evaluation; a failure after it raises
    :class:`~opentrans_hf.training.outputs.IncompleteOutputs` saying where the model is and what failed.
    """
    out = Path(args.output_dir)
    log_with = trackers(args.report_to)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    enable_fsdp2_on_cpu(accelerator)
    with output_dir_lock(out, accelerator, "train"):
        try:
            return _train(accelerator, args, out)
        finally:  # on every process, also when the run fails: a tracker left open can keep a process alive
            finish_trackers(accelerator)


@dataclass
class _Run:
    """What the loop carries from step to step: the prepared objects (replaced at the spectral switch), the
    step, the history and the last checkpoint written."""

    model: object
    optimizer: object
    scheduler: object
    loader: object
    spectral: object
    pending: object
    solver: object
    max_steps: int
    steps_per_epoch: int
    trainable: list = field(default_factory=list)
    whole: list = field(default_factory=list)  # trainable parameters FSDP2 leaves unsharded (keep_scalars_whole)
    mask: object = None
    step: int = 0
    history: dict = field(default_factory=lambda: {"step": [], "loss": [], "lr": [], "eval": []})
    last_checkpoint: Path | None = None
    throughput: Throughput = field(default_factory=Throughput)

    def make_optimizer(self, m):
        return build_optimizer(m, self.solver)

    def diverged(self, at: int, problem: str) -> TrainingDiverged:
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                else "no checkpoint was written")
        return TrainingDiverged(f"training diverged at step {at}: {problem}; stopped, no model was written "
                                f"({kept}); try a lower --learning_rate or some --warmup_steps")


def _trainable(accelerator, model) -> list:
    return [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]


def _train(accelerator, args, out: Path) -> dict:
    """``training_function``: resume check, data and model, the loop, then the model and its outputs."""
    if args.spectral_warmup_steps:
        check_switch_supported(accelerator)
    on_main_process(accelerator, lambda: remove_partial_checkpoints(out))  # writes killed before they finished
    fingerprint = run_fingerprint(args, accelerator.num_processes)
    resume, spectral_state = _check_resume(accelerator, args, out, fingerprint)

    set_seed(args.seed)
    train_split, eval_splits, holdout, model, mask, spectral, pending = _data_and_model(
        accelerator, args, spectral_state)
    run = _prepare(accelerator, args, train_split, model, spectral, pending)
    run.mask = mask
    if resume is not None:
        _resume(accelerator, run, resume)

    t0 = time.time()
    _loop(accelerator, args, out, run, train_split, eval_splits, holdout, fingerprint)
    train_seconds = time.time() - t0
    return _finish(accelerator, args, out, run, mask, train_split, eval_splits, holdout, train_seconds)


def _check_resume(accelerator, args, out: Path, fingerprint: dict):
    """Before any heavy work, so that a wrong checkpoint fails at once: ``((checkpoint, step) or None,
    the checkpoint's spectral config or None)``."""
    if not args.resume_from_checkpoint:
        if args.checkpointing_steps and any(out.glob("step_*")):
            logger.warning(f"{out} holds checkpoints of an earlier run; this run replaces those of the steps it saves")
        return None, None
    ckpt, record, ignored = find_checkpoint(out, args.resume_from_checkpoint)
    if ignored:
        logger.warning(f"ignored (not complete checkpoints): {'; '.join(ignored)}")
    check_fingerprint(ckpt, record, fingerprint, ignore=args.ignore_checkpoint_mismatch)
    spectral_state = record.get(SPECTRAL_KEY)
    if args.spectral_warmup_steps and record["step"] >= args.spectral_warmup_steps and spectral_state is None:
        raise ValueError(f"checkpoint {ckpt} is at step {record['step']}, after the spectral warm-up of "
                         f"{args.spectral_warmup_steps} steps, but records no spectral config (made by another run?)")
    if not args.spectral_warmup_steps:
        spectral_state = None
    return (ckpt, record["step"]), spectral_state


def _data_and_model(accelerator, args, spectral_state):
    """The CLIP, the data at its resolution, the framework around it with the mask and spectral tuning ->
    ``(train_split, eval_splits, holdout, model, mask, spectral, pending)``."""
    clip_path = default_clip(args.model_name_or_path, accelerator)
    image_size = args.image_size or CLIPConfig.from_pretrained(clip_path).vision_config.image_size
    train_split, eval_splits, holdout = load_training_data(args, image_size)
    # seen classes: the training classes' names, then their other names (synonyms), so that a class of another
    # vocabulary counts as seen when any of its names was trained on (FC-CLIP's category overlap)
    seen = list(dict.fromkeys([*train_split.class_names,
                               *(n for p in train_split.class_prompts for n in class_synonyms(p))]))
    model, mask, spectral, pending = build_model(args, clip_path, image_size, seen, spectral_state)
    normalise_like(model, [train_split, *eval_splits.values()])
    if accelerator.is_main_process and spectral is not None:
        spectral.print_trainable_parameters()
    return train_split, eval_splits, holdout, model, mask, spectral, pending


def normalise_like(model, splits) -> None:
    """The splits' transforms normalise with the model's image processor's mean and std (the CLIP's own)."""
    processor = model.get_image_processor()
    for split in splits:
        transform = getattr(split, "transform", None)
        if transform is not None:
            transform.mean, transform.std = tuple(processor.image_mean), tuple(processor.image_std)


def _prepare(accelerator, args, train_split, model, spectral, pending) -> _Run:
    """The solver (the framework's defaults, the flags on top), the loader, the run's length, the optimizer
    and scheduler, all through ``accelerator.prepare``; the trackers started."""
    solver = resolve_solver(framework_class(args.framework), args)
    loader = make_loader(train_split, args.batch_size, shuffle=True, seed=args.seed)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_epochs * steps_per_epoch)
    warmup = args.spectral_warmup_steps
    if warmup and warmup >= max_steps:
        raise ValueError(f"--spectral_warmup_steps {warmup} must be below the run's {max_steps} optimizer steps "
                         f"(alpha is measured after the warm-up, then training continues)")
    run = _Run(model=model, optimizer=None, scheduler=None, loader=loader, spectral=spectral, pending=pending,
               solver=solver, max_steps=max_steps, steps_per_epoch=steps_per_epoch)
    run.whole = keep_scalars_whole(accelerator, model)
    optimizer = run.make_optimizer(model)
    scheduler = _make_scheduler(accelerator, run, optimizer)
    run.model, run.optimizer, run.loader, run.scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    run.trainable = _trainable(accelerator, run.model)
    run.throughput = Throughput(num_processes=accelerator.num_processes)
    if args.report_to:
        accelerator.init_trackers(TRACKER_PROJECT, config=hyperparameters(
            args, solver, total_steps=max_steps, num_processes=accelerator.num_processes))
    return run


def _make_scheduler(accelerator, run: _Run, optimizer):
    return build_scheduler(optimizer, run.solver, run.max_steps, accelerator.num_processes)


def _resume(accelerator, run: _Run, resume) -> None:
    """The checkpoint's state (model, optimizer, scheduler, samplers, RNGs) and its history."""
    last_checkpoint, step = resume
    load_checkpoint_state(accelerator, last_checkpoint)
    hist = last_checkpoint / "history.json"
    if hist.is_file():
        run.history = read_history(hist, step)
    logger.info(f"resumed from {last_checkpoint} at step {step}")
    run.last_checkpoint, run.step = last_checkpoint, step


def _loop(accelerator, args, out: Path, run: _Run, train_split, eval_splits, holdout, fingerprint) -> None:
    """Epochs of optimizer steps up to ``run.max_steps``, from ``run.step`` (a resumed epoch skips the batches
    it already trained on)."""
    class_prompts = train_split.class_prompts  # what the model scores per class (synonyms for benchmarks)
    bar = tqdm(total=run.max_steps, initial=run.step, desc="train", disable=not accelerator.is_main_process)
    run.model.train()
    run.throughput.restart()
    while run.step < run.max_steps:
        epoch = run.step // run.steps_per_epoch
        train_split.set_epoch(epoch)
        run.loader.set_epoch(epoch)
        skip = (run.step - epoch * run.steps_per_epoch) * args.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        running = []
        for batch in epoch_loader:
            _micro_batch(accelerator, run, batch, class_prompts, running)
            if not accelerator.sync_gradients:
                continue
            run.step += 1
            problem = weights_problem(accelerator, run.trainable)
            if problem is not None:
                raise run.diverged(run.step, problem)
            loss = accelerator.reduce(torch.stack(running).mean(), reduction="mean").item()
            running = []
            _log_step(accelerator, args, run, bar, loss)
            _after_step(accelerator, args, out, run, eval_splits, holdout, fingerprint)
            run.throughput.restart()  # the next step's time leaves out evaluation and checkpoints
            if run.step >= run.max_steps:
                break
    bar.close()


def _micro_batch(accelerator, run: _Run, batch, class_prompts, running: list) -> None:
    """Forward and backward of one micro-batch; at the last of an optimizer step, the divergence check of its
    losses and gradients and the gradient clipping; the (accumulated) optimizer step."""
    with accelerator.accumulate(run.model):
        outputs = run.model(pixel_values=batch["pixel_values"], labels=batch["labels"], class_names=class_prompts)
        accelerator.backward(outputs.loss)
        running.append(outputs.loss.detach())
        run.throughput.count(batch["pixel_values"].shape[0])
        if accelerator.sync_gradients:  # the micro-batches' losses and the gradients, before the step
            average_whole_gradients(accelerator, run.whole)
            problem = step_problem(accelerator, torch.stack(running), run.trainable,
                                   check_grads=accelerator.scaler is None)
            if problem is not None:
                raise run.diverged(run.step + 1, problem)
            if run.solver.max_grad_norm is not None:
                # under FSDP all of the model's parameters: Accelerate's sharded norm (frozen ones have no gradient)
                params = list(run.model.parameters()) if is_sharded(accelerator) else [p for _, p in run.trainable]
                accelerator.clip_grad_norm_(params, run.solver.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()


def _log_step(accelerator, args, run: _Run, bar, loss: float) -> None:
    """The step's loss and learning rate: history, progress bar; with its throughput: trackers."""
    history = run.history
    history["step"].append(run.step)
    history["loss"].append(loss)
    history.setdefault("lr", []).append(run.scheduler.get_last_lr()[0])
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}")
    _report(accelerator, args, {"train/loss": loss, "lr": run.scheduler.get_last_lr()[0],
                                **run.throughput.scalars()}, run.step)


def _report(accelerator, args, values: dict, step: int) -> None:
    """``values`` to the trackers of ``--report_to`` at ``step`` (accelerate logs on the main process only)."""
    if args.report_to:
        accelerator.log(values, step=step)


def _after_step(accelerator, args, out: Path, run: _Run, eval_splits, holdout, fingerprint) -> None:
    """After an optimizer step: the periodic evaluation, the spectral switch at the end of the warm-up, the
    periodic checkpoint (in that order: a checkpoint at the switch records the spectral config)."""
    step, warmup = run.step, args.spectral_warmup_steps
    if args.eval_steps and step % args.eval_steps == 0 and step < run.max_steps:
        res = _evaluate_all(accelerator, run, eval_splits, args, holdout)
        run.history["eval"].append(eval_record(step, res))
        _report(accelerator, args, eval_scalars(res), step)
    if run.pending is not None and step == warmup:  # the paper's protocol: alpha after the warm-up
        _switch(accelerator, run)
        _report(accelerator, args, switch_scalars(run.history["spectral_switch"]), step)
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        state = run.spectral.spectral_config.to_dict() if warmup and run.spectral is not None else None
        run.last_checkpoint = save_checkpoint(accelerator, out, step, run.history, fingerprint,
                                              spectral_config=state)


def _switch(accelerator, run: _Run) -> None:
    """The end of the warm-up: alpha measured now, the freeze rule applied, optimizer and scheduler rebuilt."""
    run.model, run.optimizer, run.scheduler, run.spectral = switch_to_spectral_tuning(
        accelerator, run.model, run.optimizer, run.scheduler, run.pending, run.make_optimizer,
        lambda opt: _make_scheduler(accelerator, run, opt))
    run.pending = None
    run.trainable = _trainable(accelerator, run.model)
    step, spectral = run.step, run.spectral
    run.history["spectral_switch"] = switch_record(spectral, step)
    if accelerator.is_main_process:
        logger.info(f"spectral tuning after {step} warm-up steps:")
        spectral.print_trainable_parameters()


def _finish(accelerator, args, out: Path, run: _Run, mask, train_split, eval_splits, holdout,
            train_seconds: float) -> dict:
    """The model first (atomically), then what can fail without losing it: evaluation, card, metrics, push."""
    accelerator.wait_for_everyone()
    plain = accelerator.unwrap_model(run.model)
    model_dir = out / "model"
    history, spectral = run.history, run.spectral
    switched = history.get("spectral_switch")
    state = gathered_state_dict(accelerator, run.model)  # under FSDP the gathered weights (a collective)
    try:
        paths = on_main_process(accelerator, lambda: write_model(out, plain, mask, spectral,
                                                                 switched["step"] if switched else 0, state_dict=state))
    except WriteError as err:  # disk full, no permission: say what is left to resume from
        raise err.keeping(f"{err.kept}; {kept_checkpoint(out)}") from err
    state = None  # the gathered weights are written: free them before the evaluation
    logger.info(f"model saved to {model_dir}")
    stage = "the final evaluation"
    try:
        evaluated = _eval_model(accelerator, run)
        final = _evaluate_all(accelerator, run, eval_splits, args, holdout, model=evaluated)
        history["eval"].append(eval_record(run.step, final))
        _report(accelerator, args, eval_scalars(final), run.step)
        metrics = {
            "framework": args.framework,
            "steps": run.step,
            "train_seconds": round(train_seconds, 2),
            "final_train_loss": history["loss"][-1] if history["loss"] else None,
            "train_classes": train_split.class_names,
            "holdout_classes": list(holdout),
            "eval": final,
            "units": METRIC_UNITS,
            "num_processes": accelerator.num_processes,
            "spectral_switch": history.get("spectral_switch"),
            "solver": run.solver.to_dict(),
        }
        stage = "writing the model card, metrics and plots"
        on_main_process(accelerator, lambda: write_outputs(out, plain, args, metrics, history, mask, spectral,
                                                           eval_splits, paths=paths,
                                                           predictor=evaluated if is_sharded(accelerator) else None))
        if args.push_to_hub:
            stage = f"pushing it to the Hub ({args.hub_model_id})"
            private = True if args.hub_private_repo else None  # None: the visibility the account gives new repos
            url = on_main_process(accelerator, lambda: push_folder_to_hub(  # model, processor, card, adapters: one commit
                model_dir, args.hub_model_id, commit_message="Upload OVS model with opentrans-hf",
                private=private, token=args.hub_token, revision=args.hub_revision))
            logger.info(f"pushed to {url}")
    except Exception as err:  # noqa: BLE001 - reported with where the model is
        raise IncompleteOutputs(model_dir, stage, err) from err
    return metrics


def eval_record(step: int, results: dict) -> dict:
    """One point of the learning curves in ``history["eval"]``: mIoU per evaluation split and, where the split
    has them, its seen / unseen mIoU (``"<split> seen"``, ``"<split> unseen"``)."""
    record = {"step": step}
    for name, res in results.items():
        record[name] = res["mean_iou"]
        for part in ("seen", "unseen"):
            if res.get(f"mean_iou_{part}") is not None:
                record[f"{name} {part}"] = res[f"mean_iou_{part}"]
    return record


def _eval_model(accelerator, run: _Run):
    """What evaluation runs: the unwrapped model, or under FSDP a plain copy of it on every process (the
    examples are sharded over the processes, so they do not run the same forwards that gather the
    weights' shards); see :mod:`opentrans_hf.training.fsdp`."""
    if is_sharded(accelerator):
        return plain_copy(accelerator, run.model, run.spectral, run.mask)
    return accelerator.unwrap_model(run.model)


def _evaluate_all(accelerator, run: _Run, eval_splits, args, holdout, model=None) -> dict:
    plain = model if model is not None else _eval_model(accelerator, run)
    seen = plain.config.seen_class_names if hasattr(plain, "config") else None
    results = evaluate_splits(plain, eval_splits, seen_classes=seen, batch_size=args.batch_size,
                              accelerator=accelerator, max_examples=args.max_eval_examples)
    for name, res in results.items():  # percent for people; the results keep fractions of 1
        logger.info(f"[{name}] mIoU {percent(res['mean_iou'])}%  pixel acc {percent(res['overall_accuracy'])}%"
                    + (f"  seen {percent(res['mean_iou_seen'])}%" if "mean_iou_seen" in res else "")
                    + (f"  unseen {percent(res['mean_iou_unseen'])}%" if "mean_iou_unseen" in res else "")
                    + (f"  ({res['vocabulary']})" if res.get("vocabulary") else ""))
    return results
