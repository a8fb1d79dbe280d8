"""The Accelerate fine-tuning job: an OVS framework on an HF segmentation dataset, with a transferred
sparse mask and spectral tuning, evaluated zero-shot on other datasets.

Runs under ``accelerate launch`` (any number of processes) and plain ``python``; entry points are
``scripts/train.py`` and ``opentrans-hf train`` (both parse :class:`TrainArguments`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..io import atomic_write_text, read_json

FRAMEWORKS = ("deeplabv3", "mask2former", "fcclip")
EMBEDDED = "embedded"


@dataclass
class TrainArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP checkpoint: Hub id or local dir. Default: a random-initialised 'small' CLIP built locally (no weights are downloaded)."})
    framework: str = field(default="deeplabv3", metadata={"help": f"OVS framework: one of {FRAMEWORKS}"})
    dataset: str = field(default=EMBEDDED, metadata={"help": "training data: Hub dataset name, save_to_disk dir, image/label folder, or 'embedded' (procedural)"})
    train_split: str = field(default="train", metadata={"help": "split of --dataset to train on"})
    eval_split: str = field(default="validation", metadata={"help": "split of --dataset to evaluate on"})
    eval_datasets: list[str] = field(default_factory=list, metadata={"help": "extra zero-shot evaluation datasets, each NAME[:SPLIT]"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: detected)"})
    label_column: str | None = field(default=None, metadata={"help": "label-map column (default: detected)"})
    class_names: list[str] | None = field(default=None, metadata={"help": "class names, index = label value"})
    id2label: str | None = field(default=None, metadata={"help": "JSON file {id: name} with the class names"})
    holdout_classes: list[str] | None = field(default=None, metadata={"help": "classes left out of training (labels ignored), evaluated zero-shot ('none': train on all). Default for the embedded dataset: its held-out classes"})
    reduce_labels: bool = field(default=False, metadata={"help": "label 0 -> ignore, others -1 (ADE20K)"})
    image_size: int | None = field(default=None, metadata={"help": "train/eval resolution (default: CLIP's image size)"})
    spectral_config: str | None = field(default=None, metadata={"help": "SpectralTuningConfig: adapter dir / Hub id or a JSON file"})
    freeze_rule: str | None = field(default=None, metadata={"help": "spectral tuning of the vision encoder with this rule (median, ratio, threshold, top_k) when no --spectral_config"})
    mask: str | None = field(default=None, metadata={"help": "SparseMask adapter dir or Hub id, applied to the CLIP image encoder"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps (overrides num_epochs when set)"})
    num_epochs: int | None = field(default=None, metadata={"help": "epochs (used when max_steps <= 0)"})
    batch_size: int = field(default=8, metadata={"help": "per-process batch size"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "scheduler warmup steps"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    output_dir: str = field(default="runs/train", metadata={"help": "where everything is written"})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "save accelerate state every N steps"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir, or 'latest'"})
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (and always at the end)"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "cap on evaluation examples per dataset"})
    report_to: str | None = field(default=None, metadata={"help": "accelerate trackers (tensorboard, wandb, ...)"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the trained model and adapters"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push_to_hub"})
    embedded_size: int = field(default=192, metadata={"help": "examples in the embedded dataset's train split"})

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}; choose one of {FRAMEWORKS}")
        if self.max_steps <= 0 and not self.num_epochs:
            raise ValueError("set max_steps > 0 or num_epochs")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.spectral_config and self.freeze_rule:
            raise ValueError("give either --spectral_config or --freeze_rule, not both")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per :class:`TrainArguments` field."""
    parser = parser or argparse.ArgumentParser(description=__doc__)
    for f in fields(TrainArguments):
        help_ = f.metadata.get("help", "")
        name = f"--{f.name}"
        default = f.default if f.default is not field else None
        if f.type in ("bool", bool):
            parser.add_argument(name, action="store_true", help=help_)
        elif "list" in str(f.type):
            parser.add_argument(name, nargs="+", default=None, help=help_)
        elif "int" in str(f.type) and "str" not in str(f.type):
            parser.add_argument(name, type=int, default=default, help=help_)
        elif "float" in str(f.type):
            parser.add_argument(name, type=float, default=default, help=help_)
        else:
            parser.add_argument(name, default=default, help=help_)
    return parser


def args_from_namespace(ns: argparse.Namespace) -> TrainArguments:
    names = {f.name for f in fields(TrainArguments)}
    ns = {k: v for k, v in vars(ns).items() if k in names}
    ns = {k: v for k, v in ns.items() if v is not None or k in ("class_names", "holdout_classes")}
    if ns.get("eval_datasets") is None:
        ns.pop("eval_datasets", None)
    return TrainArguments(**ns)


def parse_args(argv=None) -> TrainArguments:
    return args_from_namespace(build_parser().parse_args(argv))


def framework_class(name: str):
    from ..frameworks import FRAMEWORKS

    return FRAMEWORKS[name]


def load_source(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
                class_names=None, id2label=None, image_column=None, label_column=None) -> dict:
    """One split of a dataset (``'embedded'``, Hub name, ``save_to_disk`` dir or image/label folder):
    the HF dataset, its class names and columns, and its default held-out classes."""
    from ..data.loading import find_columns, load_segmentation_dataset, resolve_class_names

    if name == EMBEDDED:
        from ..data import synthetic

        ds = synthetic.embedded_dataset(split, num_train=embedded_size, image_size=image_size, seed=seed)
        names = resolve_class_names(ds)
        holdout = list(synthetic.HELD_OUT_CLASSES)
    else:
        ds = load_segmentation_dataset(name, split)
        names = resolve_class_names(ds, class_names=class_names, id2label=id2label)
        holdout = []
    img_col, lab_col = find_columns(ds, image_column, label_column)
    if lab_col is None:
        raise ValueError(f"dataset {name!r} split {split!r} has no label column (columns: {ds.column_names})")
    return {"ds": ds, "names": names, "image_column": img_col, "label_column": lab_col, "holdout": holdout}


def make_split(source: dict, image_size: int, *, train: bool = False, reduce_labels: bool = False,
               keep_classes=None, seed: int = 0):
    """A :class:`SegmentationSplit` of a :func:`load_source` result with the training or evaluation transform."""
    from ..data.transforms import SegmentationTransform
    from .data import SegmentationSplit

    names = source["names"]
    tf = SegmentationTransform(image_size, train=train, reduce_labels=reduce_labels, num_labels=len(names))
    if keep_classes is not None and list(keep_classes) == names:
        keep_classes = None
    return SegmentationSplit(source["ds"], source["image_column"], source["label_column"], names, tf,
                             keep_classes=keep_classes, seed=seed)


def load_split(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
               reduce_labels: bool = False, **source_kwargs):
    """An evaluation :class:`SegmentationSplit` of one dataset split (:func:`load_source` + :func:`make_split`)."""
    source = load_source(name, split, image_size, seed=seed, embedded_size=embedded_size, **source_kwargs)
    return make_split(source, image_size, reduce_labels=reduce_labels, seed=seed)


def parse_split_spec(spec: str, default_split: str = "validation") -> tuple[str, str]:
    """``NAME[:SPLIT]`` (a local path may itself contain ':' only if it exists as given)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, default_split
    name, _, split = spec.rpartition(":")
    return name, split or default_split


def load_training_data(args: TrainArguments, image_size: int):
    """(train split on the seen classes, {name: eval split}, held-out classes)."""
    common = dict(seed=args.seed, embedded_size=args.embedded_size, class_names=args.class_names,
                  id2label=args.id2label, image_column=args.image_column, label_column=args.label_column)
    source = load_source(args.dataset, args.train_split, image_size, **common)
    names = source["names"]
    holdout = list(args.holdout_classes) if args.holdout_classes is not None else source["holdout"]
    if [c.lower() for c in holdout] == ["none"]:
        holdout = []
    unknown = [c for c in holdout if c not in names]
    if unknown:
        raise ValueError(f"--holdout_classes {unknown} are not classes of {args.dataset!r} ({names})")
    seen = [c for c in names if c not in holdout]
    if not seen:
        raise ValueError(f"all classes {names} are held out: nothing to train on")
    train = make_split(source, image_size, train=True, reduce_labels=args.reduce_labels, keep_classes=seen,
                       seed=args.seed)
    evals = {f"{args.dataset}:{args.eval_split}": load_split(args.dataset, args.eval_split, image_size,
                                                             reduce_labels=args.reduce_labels, **common)}
    for spec in args.eval_datasets:
        name, split = parse_split_spec(spec)
        evals[f"{name}:{split}"] = load_split(name, split, image_size, seed=args.seed, embedded_size=args.embedded_size)
    return train, evals, holdout


def build_model(args: TrainArguments, clip_path: str, image_size: int, seen_classes: list[str]):
    """The framework around the CLIP, with the mask applied and spectral tuning set up (before
    ``accelerator.prepare``: DDP needs the final ``requires_grad`` at wrap time)."""
    cls = framework_class(args.framework)
    model = cls.from_clip(clip_path, image_size=image_size, seen_class_names=list(seen_classes))
    mask = None
    if args.mask:
        from ..pruning import SparseMask

        mask = SparseMask.from_pretrained(args.mask)
        mask.apply(model, strict=True)
    spectral = None
    if args.spectral_config or args.freeze_rule:
        from ..tuning import SpectralTuningConfig, get_spectral_model

        if args.spectral_config:
            p = Path(args.spectral_config)
            if p.is_file():
                cfg = SpectralTuningConfig(**read_json(p, "spectral tuning config"))
            else:
                cfg = SpectralTuningConfig.from_pretrained(args.spectral_config)
        else:
            cfg = SpectralTuningConfig(freeze_rule=args.freeze_rule, target_modules=model.encoder_target_modules())
        spectral = get_spectral_model(model, cfg)
        model = spectral
    return model, mask, spectral


def run_training(args: TrainArguments) -> dict:
    """Train, evaluate, write everything to ``args.output_dir``; returns the final metrics."""
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import CLIPConfig, get_scheduler

    from ..distributed import make_accelerator
    from ..random_clip import clip_or_random
    from .data import make_loader

    out = Path(args.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    clip_path = clip_or_random(args.model_name_or_path, out, args.seed, accelerator)
    image_size = args.image_size or CLIPConfig.from_pretrained(clip_path).vision_config.image_size
    train_split, eval_splits, holdout = load_training_data(args, image_size)
    model, mask, spectral = build_model(args, clip_path, image_size, train_split.class_names)
    if accelerator.is_main_process and spectral is not None:
        spectral.print_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    loader = make_loader(train_split, args.batch_size, shuffle=True, seed=args.seed)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * steps_per_epoch
    # Accelerate's prepared scheduler steps once per process on every optimizer step (its convention),
    # so the schedule is laid out in process-steps: warmup and decay span the given optimizer steps
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if args.report_to:
        accelerator.init_trackers("opentrans-hf", config={k: str(v) for k, v in asdict(args).items()})

    step, history = 0, {"step": [], "loss": [], "lr": [], "eval": []}
    if args.resume_from_checkpoint:
        ckpt = _find_checkpoint(out, args.resume_from_checkpoint)
        accelerator.load_state(str(ckpt))
        step = int(ckpt.name.split("_")[-1])
        hist = ckpt / "history.json"
        if hist.is_file():
            history = read_json(hist, "training history")
        accelerator.print(f"resumed from {ckpt} at step {step}")

    class_names = train_split.class_names
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    model.train()
    t0 = time.time()
    while step < max_steps:
        epoch = step // steps_per_epoch
        train_split.set_epoch(epoch)
        loader.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        running = []
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"], class_names=class_names)
                accelerator.backward(outputs.loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running.append(outputs.loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss = accelerator.reduce(torch.stack(running).mean(), reduction="mean").item()
            running = []
            history["step"].append(step)
            history["loss"].append(loss)
            history.setdefault("lr", []).append(scheduler.get_last_lr()[0])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if args.report_to:
                accelerator.log({"train/loss": loss, "lr": scheduler.get_last_lr()[0]}, step=step)
            if args.eval_steps and step % args.eval_steps == 0 and step < max_steps:
                res = _evaluate_all(accelerator, model, eval_splits, args, holdout)
                history["eval"].append({"step": step, **{k: v["mean_iou"] for k, v in res.items()}})
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                _save_checkpoint(accelerator, out / f"step_{step}", history)
            if step >= max_steps:
                break
    bar.close()
    train_seconds = time.time() - t0
    final = _evaluate_all(accelerator, model, eval_splits, args, holdout)
    history["eval"].append({"step": step, **{k: v["mean_iou"] for k, v in final.items()}})
    metrics = {
        "framework": args.framework,
        "steps": step,
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": history["loss"][-1] if history["loss"] else None,
        "train_classes": class_names,
        "holdout_classes": list(holdout),
        "eval": final,
        "num_processes": accelerator.num_processes,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from .outputs import write_outputs

        paths = write_outputs(out, accelerator.unwrap_model(model), args, metrics, history, mask, spectral, eval_splits)
        if args.push_to_hub:
            from ..hub import push_folder_to_hub

            url = push_folder_to_hub(paths["model"], args.hub_model_id, commit_message="Upload OVS model with opentrans-hf")
            accelerator.print(f"pushed to {url}")
    accelerator.wait_for_everyone()
    if args.report_to:
        accelerator.end_training()
    return metrics


def _evaluate_all(accelerator, model, eval_splits, args, holdout) -> dict:
    from .evaluation import evaluate_splits

    plain = accelerator.unwrap_model(model)
    seen = plain.config.seen_class_names if hasattr(plain, "config") else None
    results = evaluate_splits(plain, eval_splits, seen_classes=seen, batch_size=args.batch_size,
                              accelerator=accelerator, max_examples=args.max_eval_examples)
    for name, res in results.items():
        accelerator.print(f"[{name}] mIoU {res['mean_iou']:.4f}  pixel acc {res['overall_accuracy']:.4f}"
                          + (f"  seen {res['mean_iou_seen']:.4f}" if "mean_iou_seen" in res else "")
                          + (f"  unseen {res['mean_iou_unseen']:.4f}" if "mean_iou_unseen" in res else ""))
    return results


def _save_checkpoint(accelerator, path: Path, history: dict) -> None:
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        atomic_write_text(path / "history.json", json.dumps(history))
    accelerator.wait_for_everyone()


def _find_checkpoint(out: Path, spec: str) -> Path:
    if spec != "latest":
        p = Path(spec)
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint directory {p} does not exist")
        return p
    ckpts = sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not ckpts:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_* checkpoint in {out}")
    return ckpts[-1]


def main(argv=None) -> dict:
    return run_training(parse_args(argv))
