"""Fine-tune an open-vocabulary segmentation framework around a CLIP, with a transferred sparse mask
and spectral tuning, then evaluate zero-shot. Runs under ``accelerate launch`` (any number of
processes) and plain ``python``:

    accelerate launch scripts/train.py --framework deeplabv3 --freeze_rule median \\
        --mask runs/prune/mask --output_dir runs/train

Steps vs epochs as in transformers: --num_epochs sets the length unless --max_steps is positive.

Benchmarks: --benchmark NAME (e.g. coco_panoptic133, the field's training vocabulary; `opentrans-hf
benchmarks` lists them) trains on that benchmark: its Hub copy, or the data --dataset gives (a directory
written by `opentrans-hf prepare-dataset`, or the benchmark in its raw form), with its class names and
synonyms, its label conventions, and every class seen.

Data: --class_names / --id2label / --reduce_labels / --ignore_index / --image_column / --label_column
describe --dataset (its training split and its evaluation split) and nothing else. Its class names come
from those flags or from the dataset itself (an id2label.json in its directory or Hub repo, a ClassLabel
feature of the label column), never from another column. Its evaluation split is --eval_split (default
'validation'; a dataset without it is an error), or with --validation_split_percentage P a fixed P
percent of the training split, chosen by --seed and left out of training. Each --eval_datasets entry is
a dataset spec of its own: NAME[:SPLIT] for a dataset that carries its own class names, or a .json
file {"dataset": ..., "split": ..., "id2label": ... | "class_names": [...], "reduce_labels": ...,
"ignore_index": ..., "image_column": ..., "label_column": ..., "name": ...} (see `opentrans-hf evaluate
--help`). metrics.json holds the metrics as fractions of 1 (the Hub mean_iou metric's keys); logs, tables
and the model card show percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


from opentrans_hf.commands import (
    OVERWRITE_HELP,
    ArgumentError,
    check_at_least_one,
    check_finite,
    check_holdout_classes,
    check_local_paths,
    check_output_dir,
    check_percentage,
    check_positive,
    claim,
)
from opentrans_hf.commands.arguments import (
    FRAMEWORKS,
    ClipArguments,
    DatasetArguments,
    Framework,  # noqa: F401 - importable from here as before
    FrameworkArguments,
    RunArguments,
)
from opentrans_hf.data.assembly import EMBEDDED
from opentrans_hf.data.benchmarks import get_benchmark
from opentrans_hf.data.specs import parse_dataset_spec
from opentrans_hf.methods.spectral_tuning.config import FREEZE_RULES
from opentrans_hf.models.configuration_ovs import (
    SCHEDULES as SCHEDULERS,  # transformers' schedules needing only the step count
)
from opentrans_hf.training.optim import resolve_solver
from opentrans_hf.training.outputs import TRAIN_LAYOUT
from opentrans_hf.training.trainer import config_overrides, framework_class, run_training
from opentrans_hf.training.warmup import check_warmup_config, spectral_config_of
from opentrans_hf.utils.distributed import make_state
from opentrans_hf.utils.hub import is_offline
from opentrans_hf.utils.locking import output_dir_lock

FreezeRule = Literal[FREEZE_RULES]
Scheduler = Literal[SCHEDULERS]
MixedPrecision = Literal["no", "fp16", "bf16"]


@dataclass
class TrainArguments(RunArguments, DatasetArguments, FrameworkArguments, ClipArguments):
    train_split: str = field(default="train", metadata={"help": "split of --dataset to train on"})
    eval_split: str | None = field(default=None, metadata={"help": "split of --dataset to evaluate on (default: validation); not with --validation_split_percentage"})
    validation_split_percentage: float | None = field(default=None, metadata={"help": "evaluate on this percentage of --train_split instead of --eval_split: a fixed part (chosen by --seed), left out of training"})
    image_size: int | None = field(default=None, metadata={"help": "train/eval resolution (default: CLIP's image size)"})
    spectral_config: str | None = field(default=None, metadata={"help": "SpectralTuningConfig: adapter dir / Hub id or a JSON file"})
    freeze_rule: FreezeRule | None = field(default=None, metadata={"help": "spectral tuning of the vision encoder with this rule when no --spectral_config (default: no spectral tuning)"})
    spectral_warmup_steps: int = field(default=0, metadata={"help": "the paper's protocol: fine-tune every target layer for N optimizer steps, then measure alpha, freeze by the rule and continue (needs --freeze_rule, or a --spectral_config without layer_alphas). 0: alpha of the starting weights (the paper's alpha*)"})
    mask: str | None = field(default=None, metadata={"help": "SparseMask adapter dir or Hub id, applied to the CLIP image encoder"})
    num_epochs: float = field(default=3.0, metadata={"help": "epochs over the training split (ignored when --max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; a positive value overrides --num_epochs"})
    learning_rate: float | None = field(default=None, metadata={"help": "AdamW learning rate of the heads (default: the framework's solver: deeplabv3 1e-3, mask2former/fcclip 1e-4)"})
    backbone_lr_multiplier: float | None = field(default=None, metadata={"help": "the CLIP's parameters train at learning_rate x this (default: the framework's: deeplabv3 1.0, mask2former/fcclip 0.1)"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (default: the framework's: deeplabv3 0.01, mask2former/fcclip 0.05)"})
    weight_decay_norm: float | None = field(default=None, metadata={"help": "weight decay of normalisation layers (default: the framework's; mask2former/fcclip 0)"})
    weight_decay_embed: float | None = field(default=None, metadata={"help": "weight decay of embeddings, logit scales and the void embedding (default: the framework's; mask2former/fcclip 0)"})
    lr_scheduler_type: Scheduler | None = field(default=None, metadata={"help": "transformers learning-rate schedule after the warm-up (default: the framework's: deeplabv3 linear, mask2former/fcclip polynomial)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warm-up steps (default: the framework's)"})
    poly_power: float | None = field(default=None, metadata={"help": "power of the polynomial schedule (default: 0.9, detectron2's)"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "clip the gradient of all trainable parameters to this L2 norm; 0: no clipping (default: the framework's: mask2former/fcclip 0.01, deeplabv3 none)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    mixed_precision: MixedPrecision = field(default="no", metadata={"help": "Accelerate mixed precision"})
    output_dir: str = field(default="runs/train", metadata={"help": "where everything is written"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": OVERWRITE_HELP + " (--resume_from_checkpoint)"})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "save the full training state every N steps (default: never)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir, or 'latest' (the complete checkpoint in --output_dir with the highest recorded step); refused if it was made with other arguments"})
    ignore_checkpoint_mismatch: bool = field(default=False, metadata={"help": "resume even if the checkpoint was made with other arguments (the differences are printed)"})
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (and always at the end)"})
    report_to: str | None = field(default=None, metadata={"help": "accelerate trackers: one (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio), several separated by commas (tensorboard,wandb), or 'all' (every installed one)"})
    push_to_hub: bool = field(default=False, metadata={"help": "at the end, push the model directory (weights, config, processor, card, spectral_adapter/ and mask_adapter/) to --hub_model_id in one commit"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id ('owner/name' or 'name' under your account) for --push_to_hub; also the model card's name"})
    hub_private_repo: bool = field(default=False, metadata={"help": "with --push_to_hub: create the repo private (default: the visibility your account or organisation gives new repos); an existing repo keeps its visibility"})
    hub_revision: str | None = field(default=None, metadata={"help": "with --push_to_hub: the branch to push to, created from the default branch if missing (default: the default branch)"})
    hub_token: str | None = field(default=None, metadata={"help": "with --push_to_hub: the Hub token (default: the logged-in one, hf auth login / HF_TOKEN); never written to metrics.json or the trackers"})

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ArgumentError(f"unknown framework {self.framework!r}; choose one of {FRAMEWORKS}")
        if self.freeze_rule is not None and self.freeze_rule not in FREEZE_RULES:
            raise ArgumentError(f"unknown freeze_rule {self.freeze_rule!r}; choose one of {FREEZE_RULES}")
        if self.lr_scheduler_type is not None and self.lr_scheduler_type not in SCHEDULERS:
            raise ArgumentError(f"unknown lr_scheduler_type {self.lr_scheduler_type!r}; choose one of {SCHEDULERS}")
        check_positive("learning_rate", self.learning_rate)
        check_finite(self, *FLOAT_SOLVER_FLAGS)
        check_solver(self)
        if self.max_steps <= 0 and not self.num_epochs > 0:
            raise ArgumentError(f"set --max_steps > 0 or --num_epochs > 0 (got max_steps={self.max_steps}, "
                                f"num_epochs={self.num_epochs})")
        check_at_least_one(self, "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "eval_steps",
                           "max_eval_examples", "image_size", "embedded_size")
        check_output_dir(self)
        if self.overwrite_output_dir and self.resume_from_checkpoint and resumes_output_dir(self):
            raise ArgumentError(f"--overwrite_output_dir would remove the checkpoint --resume_from_checkpoint "
                                f"{self.resume_from_checkpoint} resumes from; give one of them")
        check_hub_arguments(self)
        if self.spectral_config and self.freeze_rule:
            raise ArgumentError("give either --spectral_config or --freeze_rule, not both")
        check_spectral_config(self)
        check_spectral_warmup(self)
        check_config_overrides(self)
        check_local_paths(self, "model_name_or_path", "mask", "spectral_config")
        check_benchmark(self)
        check_holdout_classes(self)
        check_data_arguments(self)


def check_hub_arguments(args) -> None:
    """--push_to_hub has a repo id and can push (HF_HUB_OFFLINE unset: refused now, not after training); the
    other --hub_* flags (but --hub_model_id, also the card's name) only with --push_to_hub."""
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ArgumentError("--push_to_hub needs --hub_model_id")
        if is_offline():
            raise ArgumentError(f"--push_to_hub {args.hub_model_id}: HF_HUB_OFFLINE is set, so nothing can be "
                                f"pushed; unset it, or train without --push_to_hub and push the model directory later")
        return
    given = [f"--{name}" for name in ("hub_private_repo", "hub_revision", "hub_token")
             if getattr(args, name) not in (None, False)]
    if given:
        raise ArgumentError(f"{', '.join(given)} only apply with --push_to_hub")


FLOAT_SOLVER_FLAGS = ("backbone_lr_multiplier", "weight_decay", "weight_decay_norm", "weight_decay_embed", "poly_power",
                      "max_grad_norm")


def resumes_output_dir(args) -> bool:
    """The run resumes a checkpoint of its own --output_dir ('latest', or a checkpoint folder inside it)."""
    spec = args.resume_from_checkpoint
    if not spec:
        return False
    if spec == "latest":
        return True
    out = Path(args.output_dir).expanduser().resolve()
    return out in Path(spec).expanduser().resolve().parents


def check_solver(args) -> None:
    """The solver flags on top of --framework's solver defaults make a valid solver."""
    try:
        resolve_solver(framework_class(args.framework), args)
    except ValueError as err:
        raise ArgumentError(f"solver flags for --framework {args.framework}: {err}") from None


def check_config_overrides(args) -> None:
    """--config_overrides names settings of --framework's config, with values of their types."""
    if args.config_overrides:
        try:
            config_overrides(framework_class(args.framework), args.config_overrides)
        except ValueError as err:
            raise ArgumentError(str(err)) from None


def check_spectral_config(args) -> None:
    """A local --spectral_config (a JSON file or a saved adapter) is read and checked now, before anything
    loads: its fields, and for an adapter the file against the tensors its config lists (a Hub id is
    checked when it is downloaded)."""
    if args.spectral_config and Path(args.spectral_config).exists():
        try:
            spectral_config_of(args, None)
        except (ValueError, OSError) as err:
            raise ArgumentError(f"--spectral_config {args.spectral_config}: {err}") from err


def check_spectral_warmup(args) -> None:
    """--spectral_warmup_steps: >= 0, below a positive --max_steps, with a freeze rule to apply after it (a
    local --spectral_config must not have layer_alphas yet; a Hub one is checked when loaded)."""
    n = args.spectral_warmup_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ArgumentError(f"--spectral_warmup_steps must be an integer >= 0, got {n!r}")
    if not n:
        return
    if not (args.freeze_rule or args.spectral_config):
        raise ArgumentError(f"--spectral_warmup_steps {n} needs a rule to apply after the warm-up: "
                            "--freeze_rule, or --spectral_config without layer_alphas")
    if args.max_steps > 0 and n >= args.max_steps:
        raise ArgumentError(f"--spectral_warmup_steps {n} must be below --max_steps {args.max_steps} "
                            "(alpha is measured after the warm-up, then training continues)")
    if args.spectral_config and Path(args.spectral_config).exists():
        try:
            check_warmup_config(spectral_config_of(args, None), n, f"--spectral_config {args.spectral_config}")
        except ValueError as err:
            raise ArgumentError(str(err)) from err


def check_benchmark(args) -> None:
    """--benchmark: a known name (normalised), with no class names of its own given; the data is its Hub
    copy unless --dataset names other data."""
    if not args.benchmark:
        return
    try:
        args.benchmark = get_benchmark(args.benchmark).name
    except ValueError as err:
        raise ArgumentError(f"--benchmark: {err}") from err
    given = [flag for flag, value in (("--class_names", args.class_names), ("--id2label", args.id2label)) if value]
    if given:
        raise ArgumentError(f"--benchmark {args.benchmark} brings its class names; {' / '.join(given)} cannot be given with it")
    if args.dataset == EMBEDDED:
        args.dataset = args.benchmark


def check_data_arguments(args) -> None:
    """The dataset arguments of train and demo: a valid --validation_split_percentage (not with
    --eval_split), and --eval_datasets specs that parse (a missing spec file or a bad key fails here)."""
    pct = args.validation_split_percentage
    check_percentage("validation_split_percentage", pct)
    if pct is not None:
        if getattr(args, "eval_split", None) is not None:
            raise ArgumentError(f"give either --eval_split ({args.eval_split!r}) or --validation_split_percentage "
                                "(a held-out part of --train_split), not both")
    for spec in args.eval_datasets:
        try:
            parse_dataset_spec(spec)
        except ValueError as err:
            raise ArgumentError(f"--eval_datasets: {err}") from err


ARGUMENTS = TrainArguments


def run(args: TrainArguments) -> dict:
    """Train, evaluate, write everything to ``args.output_dir``; returns the final metrics. The directory is
    the run's own: holding its lock, before anything loads, earlier training outputs there are refused
    unless the run resumes one of its checkpoints, or removed with ``--overwrite_output_dir``."""
    state = make_state()
    with output_dir_lock(args.output_dir, state, "train"):
        claim(args.output_dir, TRAIN_LAYOUT, overwrite=args.overwrite_output_dir, resuming=resumes_output_dir(args),
              resume_hint="--resume_from_checkpoint latest", state=state)
        return run_training(args)
