"""The whole OpenTrans pipeline in one command (``opentrans-hf demo``, the README's main job):

1. heavy-tail spectral analysis of the CLIP image encoder (alpha per layer, report + plot);
2. semantic-agnostic iterative magnitude pruning of the encoder (distillation to the dense CLIP) -> a
   sparse mask adapter;
3. fine-tuning of an OVS framework around the CLIP with that mask applied and spectral tuning (the
   small-alpha layers frozen), on the seen classes;
4. evaluation, zero-shot on the held-out classes and on any extra datasets.

With no arguments it runs on the embedded procedural dataset with a random-initialised small CLIP built
from its config (no weights are downloaded) in a few minutes on 2 CPU cores; with
``--model_name_or_path openai/clip-vit-base-patch16 --dataset <hub dataset>`` it is the real run.
Runs under ``accelerate launch`` too.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import ArgumentError, check_at_least_one, check_local_paths
from .train import FRAMEWORKS, FreezeRule, Framework, check_data_arguments


@dataclass
class DemoArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP (Hub id or dir); default: a random-initialised small CLIP built locally"})
    dataset: str = field(default="embedded", metadata={"help": "training dataset (Hub name, save_to_disk dir, image/label folder, 'embedded')"})
    eval_datasets: list[str] = field(default_factory=list, metadata={"help": "extra zero-shot evaluation datasets, each a spec: NAME[:SPLIT] (a dataset with class names of its own) or a .json file with its class names and label conventions (see `opentrans-hf evaluate --help`)"})
    validation_split_percentage: float | None = field(default=None, metadata={"help": "evaluate on this percentage of --dataset's train split (a fixed part chosen by --seed, left out of fine-tuning) instead of its validation split"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: detected)"})
    label_column: str | None = field(default=None, metadata={"help": "label-map column (default: detected)"})
    class_names: list[str] | None = field(default=None, metadata={"help": "class names of --dataset, index = label value"})
    id2label: str | None = field(default=None, metadata={"help": "JSON file {id: name} with the class names of --dataset"})
    reduce_labels: bool = field(default=False, metadata={"help": "label 0 -> ignore, others -1 (ADE20K), for --dataset"})
    ignore_index: int = field(default=255, metadata={"help": "label value of unlabelled pixels in --dataset"})
    holdout_classes: list[str] | None = field(default=None, metadata={"help": "classes left out of training, evaluated zero-shot ('none': train on all)"})
    framework: Framework = field(default="deeplabv3", metadata={"help": "OVS framework"})
    output_dir: str = field(default="runs/demo", metadata={"help": "where everything is written"})
    estimator: Literal["opentrans", "ww"] = field(default="opentrans", metadata={"help": "alpha estimator"})
    freeze_rule: FreezeRule = field(default="median", metadata={"help": "spectral tuning rule"})
    spectral_warmup_steps: int = field(default=0, metadata={"help": "fine-tune every target layer for N steps before measuring alpha and freezing (the paper's protocol); 0: alpha of the pruned starting weights"})
    target_sparsity: float = field(default=0.9, metadata={"help": "sparsity of the pruned encoder (the paper's 0.9)"})
    prune_rate: float = field(default=0.1, metadata={"help": "fraction of remaining weights pruned per round (the paper's 0.1)"})
    prune_steps_per_round: int = field(default=10, metadata={"help": "distillation steps between rounds (the paper: 5000)"})
    max_steps: int = field(default=500, metadata={"help": "fine-tuning steps"})
    batch_size: int = field(default=8, metadata={"help": "per-process batch size"})
    learning_rate: float = field(default=1e-3, metadata={"help": "fine-tuning learning rate"})
    embedded_size: int = field(default=192, metadata={"help": "examples in the embedded dataset's train split"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "cap on evaluation examples per dataset"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    no_resume: bool = field(default=False, metadata={"help": "prune from round 0 even if output_dir/prune holds the rounds of an earlier run (needed after changing a pruning setting)"})

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ArgumentError(f"unknown framework {self.framework!r}; choose one of {FRAMEWORKS}")
        check_at_least_one(self, "max_steps")
        if not 0 <= self.spectral_warmup_steps < self.max_steps:
            raise ArgumentError(f"--spectral_warmup_steps must be >= 0 and below --max_steps {self.max_steps}, "
                                f"got {self.spectral_warmup_steps}")
        check_local_paths(self, "model_name_or_path")
        check_data_arguments(self)


ARGUMENTS = DemoArguments


def run(args: DemoArguments) -> dict:
    """The four steps, each one job's ``run`` with typed arguments; returns the summary. Holds the locks
    of its output directory and of its sub-jobs' (``prune/``, ``train/``) for the whole pipeline: no other
    run can write there meanwhile, and its own sub-jobs re-enter them."""
    from contextlib import ExitStack

    from accelerate import PartialState

    from ..distributed import cpu_only_multiprocess
    from ..locking import output_dir_lock

    state = PartialState(cpu=cpu_only_multiprocess())
    out = Path(args.output_dir)
    with ExitStack() as locks:
        for directory in (out, out / "prune", out / "train"):
            locks.enter_context(output_dir_lock(directory, state, "demo"))
        return _run(args)


def _run(args: DemoArguments) -> dict:
    from accelerate import PartialState

    from ..distributed import cpu_only_multiprocess
    from ..io import atomic_write_text, json_safe, read_json
    from ..random_clip import clip_or_random
    from ..training.evaluation import results_table
    from . import analyze, prune, train

    state = PartialState(cpu=cpu_only_multiprocess())
    out = Path(args.output_dir)
    t0 = time.time()
    clip = clip_or_random(args.model_name_or_path, out, args.seed, state)
    say = print if state.is_main_process else (lambda *a, **k: None)

    # 1. spectral analysis of the image encoder (a look at the dense model; cheap, so the main process alone)
    say(f"[1/4] spectral analysis ({args.estimator}) of the CLIP image encoder: {clip}")
    paths, spectral = {}, None
    if state.is_main_process:
        paths["spectral_report"] = out / "spectral" / "report.json"
        paths["dense_alpha_plot"] = out / "spectral" / "alpha.png"
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            say("plot skipped: matplotlib is not installed")
            paths.pop("dense_alpha_plot")
        report = analyze.run(analyze.AnalyzeArguments(
            model=clip, estimator=args.estimator, out=str(paths["spectral_report"]),
            plot=str(paths["dense_alpha_plot"]) if "dense_alpha_plot" in paths else None,
            no_progress=True, print_layers=False))
        alphas = sorted(report.alphas.values())
        spectral = {"estimator": args.estimator, "layers": len(alphas),
                    "median_alpha": statistics.median(alphas) if alphas else None}
    state.wait_for_everyone()
    t_spectral = time.time() - t0

    # 2. semantic-agnostic IMP of the encoder -> mask adapter
    say(f"[2/4] iterative magnitude pruning to {args.target_sparsity:.0%} (rate {args.prune_rate}, "
        f"{args.prune_steps_per_round} distillation steps per round)")
    pruned = prune.run(prune.PruneArguments(
        model_name_or_path=clip, dataset=args.dataset, rate=args.prune_rate, target_sparsity=args.target_sparsity,
        steps_per_round=args.prune_steps_per_round, batch_size=args.batch_size, learning_rate=1e-4,
        output_dir=str(out / "prune"), seed=args.seed, embedded_size=args.embedded_size,
        image_column=args.image_column, label_column=args.label_column,
        validation_split_percentage=args.validation_split_percentage, no_resume=args.no_resume,
    ))
    t_prune = time.time() - t0 - t_spectral

    # 3 + 4. spectral fine-tuning of the framework with the mask applied, then evaluation
    say(f"[3/4] spectral fine-tuning ({args.freeze_rule} rule) of {args.framework} with the mask, {args.max_steps} steps")
    metrics = train.run(train.TrainArguments(
        model_name_or_path=clip, framework=args.framework, dataset=args.dataset, eval_datasets=list(args.eval_datasets),
        freeze_rule=args.freeze_rule, spectral_warmup_steps=args.spectral_warmup_steps, mask=pruned["mask"], max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, output_dir=str(out / "train"), seed=args.seed,
        embedded_size=args.embedded_size, max_eval_examples=args.max_eval_examples,
        image_column=args.image_column, label_column=args.label_column, class_names=args.class_names,
        id2label=args.id2label, reduce_labels=args.reduce_labels, holdout_classes=args.holdout_classes,
        ignore_index=args.ignore_index, validation_split_percentage=args.validation_split_percentage,
    ))
    say("[4/4] evaluation (zero-shot on the held-out classes)")
    table = results_table(metrics["eval"])
    summary = {
        "clip": clip,
        "spectral": spectral,
        "pruning": pruned,
        "training": {k: metrics[k] for k in ("framework", "steps", "train_seconds", "final_train_loss",
                                             "train_classes", "holdout_classes")},
        "eval": metrics["eval"],
        "seconds": {"spectral": round(t_spectral, 1), "prune": round(t_prune, 1), "total": round(time.time() - t0, 1)},
    }
    if state.is_main_process:
        paths["pruned_mask"] = Path(pruned["mask"])
        paths.update(read_json(out / "train" / "outputs.json", "training outputs"))  # written by the train job
        paths["summary"] = atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
        say("\n" + table)
        say(f"\nfinished in {summary['seconds']['total']:.0f} s; outputs:")
        for k, v in paths.items():
            say(f"  {k:17s} {v}")
    state.wait_for_everyone()
    return summary
