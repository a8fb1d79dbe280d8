"""The whole OpenTrans pipeline in one command (``opentrans-hf demo``, the README's main job):

0. the CLIP: by default the pretrained embedded CLIP (``opentrans-hf pretrain-clip``, built once and
   cached), whose training-free dense zero-shot result is the first baseline;
1. heavy-tail spectral analysis of the CLIP image encoder (alpha per layer, report + plot);
2. semantic-agnostic iterative magnitude pruning of the encoder (distillation to the dense CLIP) -> a
   sparse mask adapter;
3. fine-tuning of an OVS framework around the CLIP with that mask applied and spectral tuning (the
   small-alpha layers frozen), on the seen classes;
4. evaluation, zero-shot on the held-out classes and on any extra datasets, beside the baselines on the
   same split: the same framework fine-tuned dense (no mask, nothing frozen), the dense CLIP without any
   training, the pruned CLIP without any training (the original CLIP weights with step 2's mask: what a
   frozen-CLIP framework keeps of the CLIP's zero-shot), and uniformly random labels.

With no arguments it runs on the embedded procedural dataset (16 classes, 4 held out of training) in a
few minutes on 2 CPU cores, no weights downloaded; with ``--model_name_or_path
openai/clip-vit-base-patch16 --dataset <hub dataset>`` it is the real run. Runs under ``accelerate
launch`` too.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import CLIPConfig

from opentrans_hf.commands import (
    ArgumentError,
    analyze,
    check_at_least_one,
    check_fraction,
    check_holdout_classes,
    check_local_paths,
    check_non_negative,
    check_output_dir,
    check_positive,
    claim,
    prune,
    train,
)
from opentrans_hf.commands.arguments import ClipArguments, DatasetArguments, FrameworkArguments, RunArguments
from opentrans_hf.commands.train import (
    FRAMEWORKS,
    FreezeRule,
    check_benchmark,
    check_config_overrides,
    check_data_arguments,
)
from opentrans_hf.data.assembly import load_training_data
from opentrans_hf.embedded.dataset import CLASS_NAMES, HELD_OUT_CLASSES
from opentrans_hf.methods.sparse_mask.mask import SparseMask
from opentrans_hf.models.zeroshot import CLIPDenseZeroShot
from opentrans_hf.training.evaluation import evaluate_splits, percent, results_table
from opentrans_hf.training.outputs import OutputLayout
from opentrans_hf.training.pretraining import default_clip
from opentrans_hf.utils.distributed import make_accelerator, make_state, on_main_process
from opentrans_hf.utils.io import atomic_write_text, json_safe, read_json
from opentrans_hf.utils.locking import output_dir_lock


@dataclass
class DemoArguments(RunArguments, DatasetArguments, FrameworkArguments, ClipArguments):
    validation_split_percentage: float | None = field(default=None, metadata={"help": "evaluate on this percentage of --dataset's train split (a fixed part chosen by --seed, left out of fine-tuning) instead of its validation split"})
    output_dir: str = field(default="runs/demo", metadata={"help": "where everything is written"})
    estimator: Literal["opentrans", "ww"] = field(default="opentrans", metadata={"help": "alpha estimator"})
    freeze_rule: FreezeRule = field(default="median", metadata={"help": "spectral tuning rule"})
    spectral_warmup_steps: int = field(default=0, metadata={"help": "fine-tune every target layer for N steps before measuring alpha and freezing (the paper's protocol); 0: alpha of the pruned starting weights"})
    target_sparsity: float = field(default=0.9, metadata={"help": "sparsity of the pruned encoder (the paper's 0.9)"})
    prune_rate: float = field(default=0.1, metadata={"help": "fraction of remaining weights pruned per round (the paper's 0.1)"})
    prune_steps_per_round: int = field(default=10, metadata={"help": "distillation steps between rounds (the paper: 5000)"})
    prune_scope: Literal["global", "layerwise"] = field(default="layerwise", metadata={"help": "magnitude ranking of the IMP rounds: layerwise (default: the same fraction of every layer, whose pruned CLIP keeps its own zero-shot at 90%%) or global (the paper's; at 90%% it strips some layers almost bare)"})
    max_steps: int = field(default=500, metadata={"help": "fine-tuning steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "fine-tuning learning rate"})
    no_baselines: bool = field(default=False, metadata={"help": "skip the dense fine-tuned baseline (a second fine-tuning run) and the other baseline rows"})
    no_resume: bool = field(default=False, metadata={"help": "prune from round 0 even if output_dir/prune holds the rounds of an earlier, unfinished demo (needed after changing a pruning setting)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "remove the outputs of an earlier demo in --output_dir before starting (only what the demo writes there; other files are kept). Without it a finished demo's directory is refused; an unfinished one is resumed (its pruning rounds kept, the fine-tuning redone)"})

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ArgumentError(f"unknown framework {self.framework!r}; choose one of {FRAMEWORKS}")
        check_at_least_one(self, "max_steps", "batch_size", "embedded_size", "max_eval_examples")
        check_non_negative(self, "prune_steps_per_round")
        check_fraction("target_sparsity", self.target_sparsity)
        check_fraction("prune_rate", self.prune_rate)
        check_positive("learning_rate", self.learning_rate)
        check_output_dir(self)
        if not 0 <= self.spectral_warmup_steps < self.max_steps:
            raise ArgumentError(f"--spectral_warmup_steps must be >= 0 and below --max_steps {self.max_steps}, "
                                f"got {self.spectral_warmup_steps}")
        check_config_overrides(self)
        check_local_paths(self, "model_name_or_path")
        check_benchmark(self)
        check_holdout_classes(self)
        check_data_arguments(self)


ARGUMENTS = DemoArguments

DEMO_LAYOUT = OutputLayout("demo", ("spectral", "prune", "train", "dense", "summary.json"))
"""What the demo writes into its output directory; summary.json, written last, marks a finished demo."""


def run(args: DemoArguments) -> dict:
    """The four steps, each one job's ``run`` with typed arguments; returns the summary. Holds the locks
    of its output directory and of its sub-jobs' (``prune/``, ``train/``) for the whole pipeline: no other
    run can write there meanwhile, and its own sub-jobs re-enter them. The directory is the demo's own: a
    finished demo there (its summary.json) is refused unless ``--overwrite_output_dir`` (which removes the
    earlier demo's outputs first); an unfinished one is resumed: its pruning rounds are kept (the prune job
    refuses rounds made with other settings) and the fine-tuning runs are redone."""
    state = make_state()
    out = Path(args.output_dir)
    with ExitStack() as locks:
        for directory in (out, out / "prune", out / "train", out / "dense"):
            locks.enter_context(output_dir_lock(directory, state, "demo"))
        finished = (out / "summary.json").is_file()
        claim(out, DEMO_LAYOUT, overwrite=args.overwrite_output_dir,
              resuming=not finished and not args.overwrite_output_dir, state=state)
        return _run(args)


def _run(args: DemoArguments) -> dict:
    state = make_state()
    out = Path(args.output_dir)
    t0 = time.time()
    say = print if state.is_main_process else (lambda *a, **k: None)
    if not args.model_name_or_path:
        say("[0/4] the pretrained embedded CLIP (built once by `opentrans-hf pretrain-clip`, then cached)")
    clip = default_clip(args.model_name_or_path, state)
    t_clip = time.time() - t0
    paths, spectral = _analysis(args, state, out, clip, say)
    t_spectral = time.time() - t0 - t_clip
    pruned = _pruning(args, out, clip, say)
    t_prune = time.time() - t0 - t_clip - t_spectral
    metrics, comparison = _finetuning(args, out, clip, pruned, say)
    t_train = time.time() - t0 - t_clip - t_spectral - t_prune
    summary = {
        "clip": clip,
        "spectral": spectral,
        "pruning": pruned,
        "training": {k: metrics[k] for k in ("framework", "steps", "train_seconds", "final_train_loss",
                                             "train_classes", "holdout_classes")},
        "eval": metrics["eval"],
        "comparison": comparison,
        "seconds": {"clip": round(t_clip, 1), "spectral": round(t_spectral, 1), "prune": round(t_prune, 1),
                    "train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    }
    on_main_process(state, lambda: _report(out, paths, pruned, metrics, comparison, summary, say))
    return summary


def _analysis(args: DemoArguments, state, out: Path, clip: str, say):
    """Step 1: spectral analysis of the image encoder (a look at the dense model; cheap, so the main process
    alone) -> ``(paths, spectral summary or None)``."""
    say(f"[1/4] spectral analysis ({args.estimator}) of the CLIP image encoder: {clip}")
    paths = {}

    def analyse():
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
        return {"estimator": args.estimator, "layers": len(alphas),
                "median_alpha": statistics.median(alphas) if alphas else None}

    spectral = on_main_process(state, analyse)  # a failure there stops every process
    return paths, spectral


def _pruning(args: DemoArguments, out: Path, clip: str, say) -> dict:
    """Step 2: semantic-agnostic IMP of the encoder -> the prune job's result (its mask adapter)."""
    say(f"[2/4] iterative magnitude pruning to {args.target_sparsity:.0%} (rate {args.prune_rate}, "
        f"{args.prune_steps_per_round} distillation steps per round, {args.prune_scope} ranking)")
    return prune.run(prune.PruneArguments(
        model_name_or_path=clip, dataset=args.dataset, rate=args.prune_rate, target_sparsity=args.target_sparsity,
        steps_per_round=args.prune_steps_per_round, batch_size=args.batch_size, learning_rate=1e-4, scope=args.prune_scope,
        output_dir=str(out / "prune"), seed=args.seed, embedded_size=args.embedded_size,
        image_column=args.image_column, label_column=args.label_column,
        validation_split_percentage=args.validation_split_percentage, no_resume=args.no_resume,
        overwrite_output_dir=args.no_resume,  # the demo's own folder: --no_resume starts its pruning afresh
    ))


def _finetuning(args: DemoArguments, out: Path, clip: str, pruned: dict, say):
    """Steps 3 and 4: spectral fine-tuning of the framework with the mask applied, its evaluation and (unless
    --no_baselines) the baselines -> ``(metrics, comparison or None)``."""
    say(f"[3/4] spectral fine-tuning ({args.freeze_rule} rule) of {args.framework} with the mask, {args.max_steps} steps")
    train_args = train.TrainArguments(
        model_name_or_path=clip, framework=args.framework, config_overrides=args.config_overrides, dataset=args.dataset, eval_datasets=list(args.eval_datasets),
        freeze_rule=args.freeze_rule, spectral_warmup_steps=args.spectral_warmup_steps, mask=pruned["mask"], max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, output_dir=str(out / "train"), seed=args.seed,
        embedded_size=args.embedded_size, max_eval_examples=args.max_eval_examples,
        image_column=args.image_column, label_column=args.label_column, class_names=args.class_names,
        id2label=args.id2label, reduce_labels=args.reduce_labels, holdout_classes=args.holdout_classes,
        ignore_index=args.ignore_index, validation_split_percentage=args.validation_split_percentage,
        benchmark=args.benchmark, overwrite_output_dir=True,  # the demo's own folder: a re-run redoes the fine-tuning
    )
    metrics = train.run(train_args)
    say("[4/4] evaluation (zero-shot on the held-out classes)" + ("" if args.no_baselines else
        ", beside the baselines: the same framework fine-tuned dense, the dense CLIP untrained, random labels"))
    comparison = None
    if not args.no_baselines:
        dense = train.run(replace(train_args, mask=None, freeze_rule=None, spectral_warmup_steps=0,
                                  output_dir=str(out / "dense")))
        comparison = baseline_rows(train_args, clip, metrics, dense, make_accelerator(), pruned=pruned)  # every process: sharded
    return metrics, comparison


def _report(out: Path, paths: dict, pruned: dict, metrics: dict, comparison, summary: dict, say) -> None:
    """On the main process: ``summary.json``, the tables and where every output is."""
    table = results_table(metrics["eval"])
    paths["pruned_mask"] = Path(pruned["mask"])
    paths.update(read_json(out / "train" / "outputs.json", "training outputs"))  # written by the train job
    paths["summary"] = atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
    say("\n" + table)
    if comparison is not None:
        say(f"\n{comparison_table(comparison)}")
    say(f"\nfinished in {summary['seconds']['total']:.0f} s; outputs:")
    for k, v in paths.items():
        say(f"  {k:17s} {v}")


def uniform_random_labels(seed: int = 0):
    """A "model" predicting uniformly random classes (seeded): the chance row of the comparison."""
    class UniformRandomLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.device_anchor = torch.nn.Parameter(torch.zeros(0))  # where evaluation puts the inputs
            self.generator = torch.Generator().manual_seed(seed)

        def predict(self, pixel_values, class_names, allow_void: bool = False):
            b, _, h, w = pixel_values.shape
            return torch.randint(0, len(class_names), (b, h, w), generator=self.generator)

    return UniformRandomLabels()


PRUNED_CLIP_ROW = "pruned CLIP (original weights x mask), no training (dense zero-shot)"


def baseline_rows(train_args, clip: str, metrics: dict, dense: dict, accelerator=None, pruned: dict | None = None) -> dict:
    """``{row: metrics}`` on the dataset's own evaluation split (the first row of ``metrics["eval"]``):
    this run's model, the same framework fine-tuned dense, the dense CLIP untrained (training-free dense
    zero-shot: patch tokens against the class prompts), with ``pruned`` (the prune job's result) the
    same CLIP's original weights with the prune job's mask, untrained (what the mask transfers to a
    frozen-CLIP framework; :func:`pruned_clip_row`), and uniformly random labels. With ``accelerator``
    a collective: every process evaluates its share of the examples."""
    name = next(iter(metrics["eval"]))
    image_size = train_args.image_size or CLIPConfig.from_pretrained(clip).vision_config.image_size
    _, eval_splits, _ = load_training_data(train_args, image_size)
    split = {name: eval_splits[name]}
    seen = metrics["train_classes"]
    common = dict(seen_classes=seen, max_examples=train_args.max_eval_examples, accelerator=accelerator)
    mask_note = "pruned + spectrally tuned" if train_args.mask else "fine-tuned"
    rows = {
        f"{metrics['framework']}, {mask_note} (this run)": metrics["eval"][name],
        f"{metrics['framework']}, dense, fully fine-tuned": dense["eval"][name],
        "dense CLIP, no training (dense zero-shot)": evaluate_splits(CLIPDenseZeroShot.from_pretrained(clip), split, **common)[name],
    }
    if pruned is not None:
        rows[PRUNED_CLIP_ROW] = pruned_clip_row(train_args, clip, pruned, split, common)
    rows["uniformly random labels"] = evaluate_splits(uniform_random_labels(train_args.seed), split, **common)[name]
    return rows


def pruned_clip_row(train_args, clip: str, pruned: dict, split: dict, common: dict) -> dict:
    """The pruned CLIP's own dense zero-shot on the demo's evaluation split: read from the prune job's
    result (``pruned["zero_shot"]["pruned"]``, measured on the embedded validation split with the held-out
    classes unseen) when that is this split with these seen classes and no example cap; otherwise (other
    data, ``--validation_split_percentage``, ``--holdout_classes``, ``--max_eval_examples``) measured here
    like the dense CLIP row, on the CLIP with the mask applied. A collective with ``common["accelerator"]``
    (every process takes the same branch: it depends on the arguments alone)."""
    (name,) = split
    zero_shot = pruned.get("zero_shot") or {}
    same_split = (train_args.dataset == "embedded" and name == "embedded:validation" and not train_args.benchmark
                  and not getattr(train_args, "image_size", None)
                  and not train_args.validation_split_percentage and train_args.max_eval_examples is None
                  and common["seen_classes"] == [c for c in CLASS_NAMES if c not in HELD_OUT_CLASSES])
    if same_split and "pruned" in zero_shot:
        return {**zero_shot["pruned"], "source": "the prune job's result (zero_shot.pruned)"}
    model = CLIPDenseZeroShot.from_pretrained(clip)
    SparseMask.from_pretrained(pruned["mask"]).apply(model.clip)
    return {**evaluate_splits(model, split, **common)[name], "source": "measured on this split"}


def comparison_table(rows: dict) -> str:
    """The demo's result beside its baselines, in percent."""
    lines = ["| model | mIoU (%) | pixel acc (%) | mIoU seen (%) | mIoU unseen (%) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {percent(r['mean_iou'])} | {percent(r.get('overall_accuracy'))} | "
                     f"{percent(r.get('mean_iou_seen'))} | {percent(r.get('mean_iou_unseen'))} |")
    return "\n".join(lines)
