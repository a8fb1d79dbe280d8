"""The paper's two tables in miniature, from one command (``opentrans-hf reproduce``):

Table 1, subnetwork transfer. Semantic-agnostic IMP runs ONCE on the bare CLIP image encoder (the
``prune`` job) -> the "Ours" mask. Each OVS framework (--frameworks) is then fine-tuned and evaluated
(the ``train`` job) with the encoder (a) dense, (b) under a Random mask with exactly Ours' per-layer
sparsity (one mask per seed, drawn by that seed: the paper's Random baseline) and (c) under Ours.
Columns: the encoder's parameters and inference FLOPs (effective: only the weights the mask keeps count;
FLOPs = 2 x multiply-accumulates, one image at the CLIP's size), seen and zero-shot unseen mIoU.

Table 2, efficient fine-tuning (DeepLabV3, dense CLIP): full fine-tuning (no --freeze_rule: the heads
and every CLIP image-encoder layer they read are trained), Random freezing (as many layers frozen as the
median rule freezes, drawn by the seed), alpha* (median rule on the alpha of the starting weights) and
alpha (median rule on the alpha measured after --spectral_warmup_steps steps of full fine-tuning, the
paper's protocol). Columns: trainable encoder parameters, training FLOPs of the run (one step counted
with torch's FLOP counter on a real batch, forward + backward, times the steps; a warm-up counts at the
full fine-tuning rate), wall time per optimizer step and its ratio to full fine-tuning, seen / unseen mIoU.

Every row is run for every seed (--seeds; --quick: the first seed only, fewer steps) and reported as
mean +- sample std over the seeds, with a statement per comparison (Random vs Ours per framework; each
freezing row vs full fine-tuning) of whether the difference of the means is within noise (|diff| < 2 x
the pooled std of the two rows; one seed cannot tell). Wall times are measured on a shared machine and
are noisy.

Writes to --output_dir: prune/ (the IMP rounds and the Ours mask: a re-run of an unfinished run resumes
them; prune_quick/ for --quick's shorter schedule), masks/ (the Random masks), table1/<framework>/<dense|random|ours>/seed<N>/
and table2/<row>/seed<N>/ (each a complete `train` output: model, metrics.json, plots; re-run each time;
table 2's full fine-tuning is table 1's dense DeepLabV3 run when both tables run with DeepLabV3),
and results.json (every run's numbers, per seed and aggregated; metrics as fractions of 1), results.md
(the tables in percent, the noise statements, the command) and mIoU_vs_flops.png (needs matplotlib), each
written atomically at the end, once every run has finished. A directory holding a finished run (its
results.json) is refused unless --overwrite_output_dir, which removes the earlier run's outputs first.

With no arguments it runs on the embedded procedural dataset and the project's default CLIP on CPU.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import CLIPConfig, CLIPVisionModel

from opentrans_hf.commands import (
    ArgumentError,
    check_at_least_one,
    check_local_paths,
    check_output_dir,
    check_positive,
    claim,
    prune,
    train,
)
from opentrans_hf.commands.arguments import ClipArguments, EmbeddedArguments
from opentrans_hf.commands.train import FRAMEWORKS, TrainArguments
from opentrans_hf.data.assembly import load_training_data, make_loader
from opentrans_hf.methods.sparse_mask import SparseMask
from opentrans_hf.methods.sparse_mask.counting import count_params_and_flops
from opentrans_hf.methods.sparse_mask.magnitude import magnitude_prune
from opentrans_hf.methods.spectral_tuning import SpectralTuningConfig, get_spectral_model
from opentrans_hf.methods.spectral_tuning.flops import estimate_training_flops
from opentrans_hf.training.cost import si
from opentrans_hf.training.evaluation import percent
from opentrans_hf.training.optim import resolve_solver
from opentrans_hf.training.outputs import OutputLayout
from opentrans_hf.training.pretraining import default_clip
from opentrans_hf.training.trainer import framework_class
from opentrans_hf.utils.distributed import make_accelerator, make_state, on_main_process
from opentrans_hf.utils.hub import quiet_loading
from opentrans_hf.utils.io import atomic_write_text, atomic_write_with, json_safe
from opentrans_hf.utils.locking import output_dir_lock
from opentrans_hf.utils.plotting import figure, require_matplotlib

# what --quick changes (only where the flag itself is not given)
QUICK_MAX_STEPS = 60
QUICK_MAX_EVAL_EXAMPLES = 48
QUICK_PRUNE_RATE, QUICK_PRUNE_STEPS_PER_ROUND = 0.2, 5
FULL_MAX_STEPS = 200
FRAMEWORK_MAX_STEPS = {"deeplabv3": FULL_MAX_STEPS, "mask2former": 600, "fcclip": 200}
"""Fine-tuning steps per framework (no --max_steps, no --quick), each from its learning curve on the embedded
benchmark (seed 0, batch 8, learning rate 1e-3, evaluated every 100-200 steps): Mask2Former's seen mIoU rises to
~74 at 600 steps and stays there; FC-CLIP peaks at 200 steps (84.0 seen / 84.8 unseen) and its unseen mIoU then
falls (77.9 at 1000) while seen creeps up."""
MINIATURE_LEARNING_RATE = 1e-3
"""The heads' learning rate of every run (the CLIP's is the framework's backbone multiplier times it): ten times
the references' 1e-4, which is meant for 50 COCO epochs; in 600 steps FC-CLIP reached 73.2 / 75.7 at 1e-4 and
84.6 / 82.5 at 1e-3, Mask2Former 52.6 / 11.7 and 74.0 / 12.2 (seen / unseen)."""
FULL_PRUNE_RATE, FULL_PRUNE_STEPS_PER_ROUND = 0.1, 10
PRUNE_SCOPE = "layerwise"
"""Ours' ranking: measured (scripts/sweep_prune_zero_shot.py) to keep the pruned CLIP's own unseen zero-shot within 5
points of the dense CLIP's at 90%, where the paper's global ranking loses 15 (it strips some layers almost bare)."""
TABLE1_ROWS = ("dense", "random", "ours")
TABLE1_LABELS = {"dense": "dense", "random": "Random mask", "ours": "Ours (IMP mask)"}
TABLE2_FRAMEWORK = "deeplabv3"
TABLE2_ROWS = ("full", "random", "alpha_star", "alpha")
TABLE2_LABELS = {"full": "full fine-tuning", "random": "Random freezing", "alpha_star": "alpha* (median, starting weights)",
                 "alpha": "alpha (median, after warm-up)"}
NOISE_RULE = "|difference of means| < 2 x pooled sample std of the two rows (over seeds)"


@dataclass
class ReproduceArguments(EmbeddedArguments, ClipArguments):
    output_dir: str = field(default="runs/reproduce", metadata={"help": "where every sub-run and the results are written"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seeds: every row is trained once per seed (mean +- std over them); --quick uses the first only"})
    quick: bool = field(default=False, metadata={"help": f"the first seed only, --max_steps {QUICK_MAX_STEPS}, at most {QUICK_MAX_EVAL_EXAMPLES} evaluation examples and a shorter IMP schedule (--prune_rate {QUICK_PRUNE_RATE}, --prune_steps_per_round {QUICK_PRUNE_STEPS_PER_ROUND}, in output_dir/prune_quick) unless those flags are given: a few minutes on 2 CPU cores"})
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS), metadata={"help": f"OVS frameworks of table 1, any of {', '.join(FRAMEWORKS)}"})
    tables: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "which tables to run: 1 (subnetwork transfer), 2 (efficient fine-tuning)"})
    max_steps: int | None = field(default=None, metadata={"help": f"fine-tuning steps of every run (default: each framework's, {', '.join(f'{k} {v}' for k, v in FRAMEWORK_MAX_STEPS.items())}; --quick: {QUICK_MAX_STEPS})"})
    spectral_warmup_steps: int | None = field(default=None, metadata={"help": "table 2's alpha row: full fine-tuning steps before alpha is measured and the median rule freezes (default: a fifth of --max_steps, at least 1)"})
    target_sparsity: float = field(default=0.9, metadata={"help": "sparsity of the IMP mask (the paper's 0.9)"})
    prune_rate: float | None = field(default=None, metadata={"help": f"fraction of the remaining weights pruned per IMP round (default: the paper's {FULL_PRUNE_RATE}; --quick: {QUICK_PRUNE_RATE})"})
    prune_steps_per_round: int | None = field(default=None, metadata={"help": f"distillation steps between IMP rounds (default: {FULL_PRUNE_STEPS_PER_ROUND}, the paper: 5000; --quick: {QUICK_PRUNE_STEPS_PER_ROUND})"})
    prune_learning_rate: float = field(default=1e-4, metadata={"help": "learning rate of the IMP distillation"})
    prune_scope: str = field(default=PRUNE_SCOPE, metadata={"help": f"IMP's magnitude ranking, as prune --scope (default {PRUNE_SCOPE!r}: the same fraction of every layer, whose pruned CLIP keeps its zero-shot best on the embedded benchmark; the paper: 'global')"})
    batch_size: int = field(default=8, metadata={"help": "batch size of pruning and fine-tuning"})
    learning_rate: float | None = field(default=MINIATURE_LEARNING_RATE, metadata={"help": f"fine-tuning learning rate of the heads (the encoder's: times the framework's backbone multiplier); the rest of each framework's solver is its own. Default {MINIATURE_LEARNING_RATE:g} (the references' 1e-4 is for long schedules); none: each framework's default"})
    max_eval_examples: int | None = field(default=None, metadata={"help": f"cap on evaluation examples (default: all; --quick: {QUICK_MAX_EVAL_EXAMPLES})"})
    no_resume: bool = field(default=False, metadata={"help": "prune from round 0 even if output_dir/prune (or prune_quick) holds the rounds of an earlier, unfinished run (needed after changing a pruning setting)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "remove the outputs of an earlier reproduce run in --output_dir before starting (only what the job writes there; other files are kept). Without it a finished run's directory (its results.json) is refused; an unfinished one is resumed (its IMP rounds kept, every fine-tuning run redone)"})

    def __post_init__(self):
        if not self.seeds:
            raise ArgumentError("--seeds must name at least one seed, got none")
        if len(set(self.seeds)) != len(self.seeds):
            raise ArgumentError(f"--seeds must be distinct, got {self.seeds}")
        if not self.frameworks:
            raise ArgumentError("--frameworks must name at least one framework, got none")
        for name in self.frameworks:
            if name not in FRAMEWORKS:
                raise ArgumentError(f"unknown framework {name!r} in --frameworks; choose from {FRAMEWORKS}")
        if len(set(self.frameworks)) != len(self.frameworks):
            raise ArgumentError(f"--frameworks must be distinct, got {self.frameworks}")
        if not self.tables or any(t not in (1, 2) for t in self.tables) or len(set(self.tables)) != len(self.tables):
            raise ArgumentError(f"--tables must be 1, 2 or both, got {self.tables}")
        check_at_least_one(self, "max_steps", "batch_size", "prune_steps_per_round", "embedded_size", "max_eval_examples")
        for name in ("target_sparsity", "prune_rate"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ArgumentError(f"--{name} must be in (0, 1), got {value:g}")
        check_positive("learning_rate", self.learning_rate)
        check_positive("prune_learning_rate", self.prune_learning_rate)
        if 2 in self.tables:
            steps, warmup = resolved_max_steps(self, TABLE2_FRAMEWORK), resolved_warmup_steps(self)
            if not 1 <= warmup < steps:
                raise ArgumentError(f"--spectral_warmup_steps must be >= 1 and below --max_steps {steps} (table 2's "
                                    f"alpha row warms up, then freezes and continues), got {warmup}")
        if self.prune_scope not in ("global", "layerwise", "alpha", "structured", "structured-layerwise"):
            raise ArgumentError(f"--prune_scope must be one of global, layerwise, alpha, structured, "
                                f"structured-layerwise, got {self.prune_scope!r}")
        check_output_dir(self)
        check_local_paths(self, "model_name_or_path")


ARGUMENTS = ReproduceArguments


def resolved_seeds(args: ReproduceArguments) -> list[int]:
    return list(args.seeds[:1] if args.quick else args.seeds)


def resolved_max_steps(args: ReproduceArguments, framework: str = TABLE2_FRAMEWORK) -> int:
    """--max_steps, else --quick's, else the framework's (:data:`FRAMEWORK_MAX_STEPS`)."""
    if args.max_steps is not None:
        return args.max_steps
    return QUICK_MAX_STEPS if args.quick else FRAMEWORK_MAX_STEPS[framework]


def resolved_warmup_steps(args: ReproduceArguments) -> int:
    if args.spectral_warmup_steps is not None:
        return args.spectral_warmup_steps
    return max(1, resolved_max_steps(args, TABLE2_FRAMEWORK) // 5)


def resolved_prune(args: ReproduceArguments) -> dict:
    """The IMP schedule and where it is written (--quick's shorter default schedule has a directory of its
    own, so that a full run in the same output_dir resumes its own rounds)."""
    quick_schedule = args.quick and args.prune_rate is None and args.prune_steps_per_round is None
    return {"rate": args.prune_rate if args.prune_rate is not None else (QUICK_PRUNE_RATE if args.quick else FULL_PRUNE_RATE),
            "steps_per_round": args.prune_steps_per_round if args.prune_steps_per_round is not None
            else (QUICK_PRUNE_STEPS_PER_ROUND if args.quick else FULL_PRUNE_STEPS_PER_ROUND),
            "dir": "prune_quick" if quick_schedule else "prune"}


def resolved_max_eval_examples(args: ReproduceArguments) -> int | None:
    if args.max_eval_examples is not None:
        return args.max_eval_examples
    return QUICK_MAX_EVAL_EXAMPLES if args.quick else None


def command_line(args: ReproduceArguments) -> str:
    """The ``opentrans-hf reproduce`` command that gives ``args`` (only the flags that differ from the defaults)."""
    parts = ["opentrans-hf", "reproduce"]
    defaults = ReproduceArguments.__dataclass_fields__
    for f in fields(ReproduceArguments):
        value = getattr(args, f.name)
        default = defaults[f.name].default_factory() if callable(defaults[f.name].default_factory) else f.default
        if value == default:
            continue
        if isinstance(value, bool):
            parts.append(f"--{f.name}")
        elif isinstance(value, list):
            parts += [f"--{f.name}", *map(str, value)]
        else:
            parts += [f"--{f.name}", str(value)]
    return " ".join(parts)


def _table1_dir(out: Path, framework: str, row: str, seed: int) -> Path:
    return out / "table1" / framework / row / f"seed{seed}"


def _table2_dir(out: Path, row: str, seed: int) -> Path:
    return out / "table2" / row / f"seed{seed}"


def full_is_table1_dense(args: ReproduceArguments) -> bool:
    """Table 2's full fine-tuning row is the very run of table 1's dense DeepLabV3 row (same arguments) when
    both tables run with DeepLabV3: it is trained once and reported in both."""
    return 1 in args.tables and 2 in args.tables and TABLE2_FRAMEWORK in args.frameworks


def _sub_run_dirs(args: ReproduceArguments, out: Path) -> list[Path]:
    dirs = [out / resolved_prune(args)["dir"], out / "masks"] if 1 in args.tables else []
    for seed in resolved_seeds(args):
        if 1 in args.tables:
            dirs += [_table1_dir(out, fw, row, seed) for fw in args.frameworks for row in TABLE1_ROWS]
        if 2 in args.tables:
            dirs += [_table2_dir(out, row, seed) for row in TABLE2_ROWS
                     if not (row == "full" and full_is_table1_dense(args))]
    return dirs


def run(args: ReproduceArguments) -> dict:
    """Both tables: the sub-jobs through their ``run`` with typed arguments; returns the results (what
    results.json holds). Holds the locks of its output directory and of every sub-run's directory for the
    whole run (its own sub-jobs re-enter them)."""
    state = make_state()
    out = Path(args.output_dir)
    with ExitStack() as locks:
        for directory in (out, *_sub_run_dirs(args, out)):
            locks.enter_context(output_dir_lock(directory, state, "reproduce"))
        finished = (out / "results.json").is_file()  # written last
        claim(out, REPRODUCE_LAYOUT, overwrite=args.overwrite_output_dir,
              resuming=not finished and not args.overwrite_output_dir, state=state)
        return _run(args, state)


REPRODUCE_LAYOUT = OutputLayout("reproduce", ("prune", "prune_quick", "masks", "table1", "table2", "results.json",
                                              "results.md", "mIoU_vs_flops.png"))
"""What reproduce writes into its output directory; results.json, written last, marks a finished run."""


def _run(args: ReproduceArguments, state) -> dict:
    out = Path(args.output_dir)
    seeds = resolved_seeds(args)
    t0 = time.time()
    say = print if state.is_main_process else (lambda *a, **k: None)
    # the one place the CLIP is looked up: every sub-run gets this path
    clip = default_clip(args.model_name_or_path, state)
    used = list(dict.fromkeys([*(args.frameworks if 1 in args.tables else []),
                               *([TABLE2_FRAMEWORK] if 2 in args.tables else [])]))
    settings = {"clip": clip, "seeds": seeds, "max_steps": resolved_max_steps(args, TABLE2_FRAMEWORK),
                "framework_max_steps": {fw: resolved_max_steps(args, fw) for fw in used},
                "solvers": {fw: resolve_solver(framework_class(fw), TrainArguments(
                    framework=fw, learning_rate=args.learning_rate)).to_dict() for fw in used},
                "spectral_warmup_steps": resolved_warmup_steps(args) if 2 in args.tables else None,
                "max_eval_examples": resolved_max_eval_examples(args), "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "embedded_size": args.embedded_size,
                "dataset": "embedded", "frameworks": list(args.frameworks) if 1 in args.tables else [],
                "tables": list(args.tables),
                "pruning": {"target_sparsity": args.target_sparsity, "scope": args.prune_scope, "rate": resolved_prune(args)["rate"],
                            "steps_per_round": resolved_prune(args)["steps_per_round"],
                            "learning_rate": args.prune_learning_rate, "seed": seeds[0],
                            "output_dir": str(out / resolved_prune(args)["dir"])} if 1 in args.tables else None}
    results = {"command": command_line(args), "settings": settings,
               "units": {"mean_iou_seen, mean_iou_unseen": "fractions of 1 (results.md shows percent)",
                         "params": "parameters (count)", "inference_flops": "FLOPs of one image (2 x MACs)",
                         "training_flops": "FLOPs of the whole run (forward + backward)",
                         "seconds_per_step": "wall-clock seconds per optimizer step",
                         "std": "sample standard deviation over seeds (null with one seed)"},
               "noise_rule": NOISE_RULE}
    seconds, dense_runs = {}, {}
    if 1 in args.tables:
        results["table1"] = _table1(args, clip, out, seeds, state, say, dense_runs)
        seconds["table1"] = round(time.time() - t0, 1)
    if 2 in args.tables:
        t2 = time.time()
        results["table2"] = _table2(args, clip, out, seeds, state, say, dense_runs)
        seconds["table2"] = round(time.time() - t2, 1)
    seconds["total"] = round(time.time() - t0, 1)
    results["seconds"] = seconds
    markdown = render_markdown(results)
    paths = on_main_process(state, lambda: _write_results(out, results, markdown))
    if state.is_main_process:
        say("\n" + markdown)
        say(f"finished in {seconds['total']:.0f} s; outputs:")
        for k, v in paths.items():
            say(f"  {k:15s} {v}")
    return results


# ----- running the rows --------------------------------------------------------------------------------

def _train(args, clip, framework, out_dir, seed, **extra) -> dict:
    return train.run(train.TrainArguments(
        model_name_or_path=clip, framework=framework, max_steps=resolved_max_steps(args, framework), batch_size=args.batch_size,
        learning_rate=args.learning_rate, output_dir=str(out_dir), seed=seed, embedded_size=args.embedded_size,
        max_eval_examples=resolved_max_eval_examples(args), overwrite_output_dir=True,  # its own sub-run: redone
        **extra))


def _run_record(metrics: dict, out_dir: Path) -> dict:
    """The numbers of one training run that the tables use (fractions of 1), read off its metrics."""
    name = next(iter(metrics["eval"]))  # the training dataset's evaluation split comes first
    ev = metrics["eval"][name]
    return {"dir": str(out_dir), "eval_split": name, "mean_iou": ev.get("mean_iou"),
            "mean_iou_seen": ev.get("mean_iou_seen"), "mean_iou_unseen": ev.get("mean_iou_unseen"),
            "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
            "seconds_per_step": metrics["train_seconds"] / metrics["steps"] if metrics["steps"] else None,
            "final_train_loss": metrics.get("final_train_loss")}


def _table1(args, clip, out, seeds, state, say, dense_runs: dict) -> dict:
    pruned, vision, ours, mask_dirs = _table1_masks(args, clip, out, seeds, state, say)
    ours_layers = ours.layer_sparsity()
    counts = _table1_counts(args, clip, pruned, vision, ours_layers, mask_dirs, seeds)
    table = {"framework_rows": {}, "pruning": {k: pruned[k] for k in ("sparsity", "rounds", "mask")},
             "ours_layer_sparsity": ours_layers}
    n = len(args.frameworks) * len(TABLE1_ROWS) * len(seeds)
    i = 0
    for fw in args.frameworks:
        rows = {}
        for row in TABLE1_ROWS:
            runs = {}
            for seed in seeds:
                i += 1
                d = _table1_dir(out, fw, row, seed)
                say(f"[table 1] run {i}/{n}: {fw}, {TABLE1_LABELS[row]}, seed {seed} -> {d}")
                metrics = _train(args, clip, fw, d, seed, mask=mask_dirs[row][seed])
                if row == "dense":
                    dense_runs[(fw, seed)] = (metrics, d)
                runs[str(seed)] = {**_run_record(metrics, d), **counts[row][seed]}
            rows[row] = {"label": TABLE1_LABELS[row], "runs": runs, "mean_std": _aggregate(
                runs, ("mean_iou_seen", "mean_iou_unseen", "effective_params", "effective_inference_flops",
                       "seconds_per_step", "clip_zero_shot_seen", "clip_zero_shot_unseen"))}
        table["framework_rows"][fw] = rows
    table["noise"] = [
        _compare(f"{fw}: Ours vs Random mask", table["framework_rows"][fw]["ours"],
                 table["framework_rows"][fw]["random"], "Ours", "Random")
        for fw in args.frameworks]
    return table


def _table1_masks(args, clip, out, seeds, state, say):
    """Table 1's masks: IMP of the bare CLIP image encoder, once (Ours), and one Random mask per seed with
    Ours' per-layer sparsity -> ``(pruned, vision encoder, Ours, {row: {seed: mask dir or None}})``."""
    schedule = resolved_prune(args)
    say(f"[table 1] IMP of the bare CLIP image encoder to {args.target_sparsity:.0%} (rate {schedule['rate']}, "
        f"{schedule['steps_per_round']} distillation steps per round, {args.prune_scope} ranking), once")
    pruned = prune.run(prune.PruneArguments(
        model_name_or_path=clip, rate=schedule["rate"], target_sparsity=args.target_sparsity,
        steps_per_round=schedule["steps_per_round"], batch_size=args.batch_size, learning_rate=args.prune_learning_rate,
        output_dir=str(out / schedule["dir"]), seed=seeds[0], embedded_size=args.embedded_size,
        no_resume=args.no_resume, overwrite_output_dir=args.no_resume, scope=args.prune_scope))
    ours = SparseMask.from_pretrained(pruned["mask"])
    with quiet_loading():
        vision = CLIPVisionModel.from_pretrained(clip, use_safetensors=True)

    def random_masks():  # the main process draws and saves them; every process then reads the same files
        made = {}
        for seed in seeds:
            mask = magnitude_prune(vision, None, scope="random", like=ours, seed=seed)
            path = out / "masks" / f"random-seed{seed}"
            mask.save_pretrained(path)
            made[seed] = str(path)
        return made

    on_main_process(state, random_masks)
    mask_dirs = {"dense": {s: None for s in seeds}, "ours": {s: pruned["mask"] for s in seeds},
                 "random": {s: str(out / "masks" / f"random-seed{s}") for s in seeds}}
    return pruned, vision, ours, mask_dirs


def _table1_counts(args, clip, pruned: dict, vision, ours_layers: dict, mask_dirs: dict, seeds) -> dict:
    """``{row: {seed: ...}}``: the encoder's parameters and inference FLOPs under the row's mask, its sparsity
    and the row's CLIP zero-shot (a collective for a Random mask)."""
    counts = {}
    for row in TABLE1_ROWS:
        counts[row] = {}
        for seed in seeds:
            mask = SparseMask.from_pretrained(mask_dirs[row][seed]) if mask_dirs[row][seed] else None
            c = count_params_and_flops(vision, mask)
            counts[row][seed] = {
                "params": c["params"], "effective_params": c["effective_params"],
                "inference_flops": 2 * c["macs"], "effective_inference_flops": 2 * c["effective_macs"],
                "sparsity": mask.sparsity if mask is not None else 0.0,
                "same_layer_sparsity_as_ours": (mask.layer_sparsity() == ours_layers) if mask is not None else None,
                "mask": mask_dirs[row][seed], **_clip_zero_shot(args, clip, pruned, row, mask, seeds[0])}
    return counts


def _clip_zero_shot(args, clip, pruned: dict, row: str, mask, seed: int) -> dict:
    """The training-free dense zero-shot (seen / unseen mIoU) of the row's own CLIP: the dense CLIP, or its
    original weights under the row's mask (what a frozen-CLIP framework such as FC-CLIP recognises with). The
    dense and Ours numbers come from the prune job's result; a Random mask is scored here, on every process (a
    collective). Empty when the prune job skipped it (it says why)."""
    zs = pruned.get("zero_shot") or {}
    if "dense" not in zs:
        return {}
    if row == "dense":
        z = zs["dense"]
    elif row == "ours":
        z = zs["pruned"]
    else:
        z = prune.pruned_zero_shot(clip, mask, prune.PruneArguments(model_name_or_path=clip, seed=seed,
                                                                    embedded_size=args.embedded_size),
                                   make_accelerator(), with_dense=False)["pruned"]
    return {"clip_zero_shot_seen": z["mean_iou_seen"], "clip_zero_shot_unseen": z["mean_iou_unseen"]}


def _table2(args, clip, out, seeds, state, say, dense_runs: dict) -> dict:
    warmup = resolved_warmup_steps(args)
    settings = {"full": {}, "random": {"freeze_rule": "random"}, "alpha_star": {"freeze_rule": "median"},
                "alpha": {"freeze_rule": "median", "spectral_warmup_steps": warmup}}
    rows = {}
    n, i = len(TABLE2_ROWS) * len(seeds), 0
    batch = None
    for row in TABLE2_ROWS:
        runs = {}
        for seed in seeds:
            i += 1
            if row == "full" and (TABLE2_FRAMEWORK, seed) in dense_runs:
                metrics, d = dense_runs[(TABLE2_FRAMEWORK, seed)]
                say(f"[table 2] run {i}/{n}: {TABLE2_FRAMEWORK}, {TABLE2_LABELS[row]}, seed {seed}: the same run as "
                    f"table 1's dense {TABLE2_FRAMEWORK} row ({d})")
            else:
                d = _table2_dir(out, row, seed)
                say(f"[table 2] run {i}/{n}: {TABLE2_FRAMEWORK}, {TABLE2_LABELS[row]}, seed {seed} -> {d}")
                metrics = _train(args, clip, TABLE2_FRAMEWORK, d, seed, **settings[row])
            record = _run_record(metrics, d)
            if batch is None:
                batch = on_main_process(state, lambda: _first_batch(args, clip, seed))
            cost = on_main_process(state, lambda: _training_cost(clip, d, metrics, batch,
                                                                 warmup if row == "alpha" else 0))
            runs[str(seed)] = {**record, **(cost or {})}
        rows[row] = {"label": TABLE2_LABELS[row], "settings": settings[row], "runs": runs,
                     "mean_std": _aggregate(runs, ("mean_iou_seen", "mean_iou_unseen", "training_flops",
                                                   "seconds_per_step", "trainable_encoder_params",
                                                   "trainable_params"))}
    full = rows["full"]["mean_std"]
    for row in TABLE2_ROWS:
        agg = rows[row]["mean_std"]
        for key, ratio in (("seconds_per_step", "time_ratio_to_full"), ("training_flops", "flops_ratio_to_full")):
            a, b = agg.get(key, {}).get("mean"), full.get(key, {}).get("mean")
            agg[ratio] = 1.0 if row == "full" else (a / b if a is not None and b else None)
    noise = [_compare(f"{TABLE2_LABELS[row]} vs full fine-tuning", rows[row], rows["full"], row, "full")
             for row in TABLE2_ROWS if row != "full"]
    reused = all((TABLE2_FRAMEWORK, seed) in dense_runs for seed in seeds)
    return {"framework": TABLE2_FRAMEWORK, "spectral_warmup_steps": warmup, "rows": rows, "noise": noise,
            "full_is_table1_dense": reused,
            "trainable": "full fine-tuning trains the heads and every CLIP image-encoder layer they read (the "
                         "framework freezes the text tower and the encoder layers after the last one read); the "
                         "freezing rows freeze, in addition, the encoder layers the rule picks (alpha: after the "
                         "warm-up, which trains what full fine-tuning trains)"}


def _first_batch(args, clip, seed) -> dict:
    """The first training batch of the embedded dataset as the train job loads it (FLOPs are counted on it)."""
    image_size = CLIPConfig.from_pretrained(clip).vision_config.image_size
    targs = train.TrainArguments(model_name_or_path=clip, framework=TABLE2_FRAMEWORK, max_steps=1, seed=seed,
                                 batch_size=args.batch_size, embedded_size=args.embedded_size)
    split, _, _ = load_training_data(targs, image_size)
    batch = next(iter(make_loader(split, args.batch_size, shuffle=False)))
    return {"pixel_values": batch["pixel_values"], "labels": batch["labels"], "class_names": list(split.class_names)}


def _training_cost(clip, run_dir: Path, metrics: dict, batch: dict, warmup: int) -> dict:
    """Trainable parameters and training FLOPs of a finished run: its framework rebuilt around the CLIP with
    the spectral adapter it saved (the layers it froze, no re-analysis), one step counted on ``batch``."""
    image_size = CLIPConfig.from_pretrained(clip).vision_config.image_size
    model = framework_class(metrics["framework"]).from_clip(clip, image_size=image_size,
                                                            seen_class_names=list(metrics["train_classes"]))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    adapter = run_dir / "model" / "spectral_adapter"
    spectral = None
    if adapter.is_dir():
        spectral = get_spectral_model(model, SpectralTuningConfig.from_pretrained(str(adapter)))
    model.train()
    inputs = {"pixel_values": batch["pixel_values"], "labels": batch["labels"], "class_names": batch["class_names"]}
    est = estimate_training_flops(model, inputs)

    def trainable(names_flags):
        return sum(p.numel() for n, p in model.named_parameters() if names_flags(n, p))

    is_encoder = lambda n: "vision_model.encoder." in n  # noqa: E731
    steps = metrics["steps"]
    per_step_warm = _unfrozen_flops(model, inputs, before) if warmup else None
    total = (steps - warmup) * est["tuned"]["total"] + (warmup * per_step_warm if warmup else 0)
    return {"training_flops": total, "training_flops_per_step": est["tuned"]["total"],
            "warmup_flops_per_step": per_step_warm,
            "trainable_params": trainable(lambda n, p: p.requires_grad),
            "trainable_encoder_params": trainable(lambda n, p: p.requires_grad and is_encoder(n)),
            "encoder_params": trainable(lambda n, p: is_encoder(n)),
            "frozen_encoder_layers": len(spectral.frozen_layers) if spectral is not None else 0,
            "analysed_encoder_layers": len(spectral.analysed_layers) if spectral is not None else None}


def _unfrozen_flops(model, inputs, flags: dict) -> int:
    """FLOPs of one step with the ``requires_grad`` of ``flags`` (what the warm-up trains), then restored."""
    params = dict(model.named_parameters())
    now = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(flags.get(n, now[n]))
        return estimate_training_flops(model, inputs)["tuned"]["total"]
    finally:
        for n, p in params.items():
            p.requires_grad_(now[n])


# ----- statistics ----------------------------------------------------------------------------------------

def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _mean_std(values: list) -> dict:
    vals = [float(v) for v in values if _finite(v)]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) >= 2 else None, "n": len(vals)}


def _aggregate(runs: dict, keys) -> dict:
    return {k: _mean_std([r.get(k) for r in runs.values()]) for k in keys}


def _compare(what: str, row: dict, base: dict, row_name: str, base_name: str) -> dict:
    """Is the difference of ``row``'s and ``base``'s mean seen / unseen mIoU within noise?"""
    verdicts = {}
    parts = []
    for key, label in (("mean_iou_unseen", "unseen"), ("mean_iou_seen", "seen")):
        a, b = row["mean_std"][key], base["mean_std"][key]
        v = {"difference": None, "threshold": None, "verdict": None}
        if a["mean"] is None or b["mean"] is None:
            v["verdict"] = "no value"
            text = f"{label} mIoU: no value to compare"
        else:
            diff = a["mean"] - b["mean"]
            v["difference"] = diff
            if min(a["n"], b["n"]) < 2:
                v["verdict"] = "cannot tell"
                text = (f"{label} mIoU {_signed_points(diff)} ({row_name} {percent(a['mean'])}, {base_name} "
                        f"{percent(b['mean'])}): 1 seed: cannot tell noise from difference")
            else:
                pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
                v["threshold"] = 2 * pooled
                within = abs(diff) < 2 * pooled or diff == 0
                v["verdict"] = "within noise" if within else "beyond noise"
                text = (f"{label} mIoU {_signed_points(diff)} ({row_name} {percent(a['mean'])} ± {percent(a['std'])}, "
                        f"{base_name} {percent(b['mean'])} ± {percent(b['std'])}; 2 × pooled std = "
                        f"{100 * 2 * pooled:.2f} points): {v['verdict']}")
        verdicts[key] = v
        parts.append(text)
    return {"comparison": what, **verdicts, "statement": f"{what}: " + "; ".join(parts) + "."}


# ----- rendering -----------------------------------------------------------------------------------------

def _signed_points(diff: float) -> str:
    return f"{100 * diff:+.2f} points"


def _pm(agg: dict, scale=100.0, fmt="{:.2f}") -> str:
    if agg is None or agg.get("mean") is None:
        return "-"
    text = fmt.format(scale * agg["mean"])
    return text + (f" ± {fmt.format(scale * agg['std'])}" if agg.get("std") is not None else "")


def _per_framework(settings: dict, key: str) -> str:
    values = settings.get(key) or {}
    return ", ".join(f"{fw} {v}" for fw, v in values.items()) or str(settings.get("max_steps"))


def _solvers(settings: dict) -> str:
    parts = []
    for fw, sv in (settings.get("solvers") or {}).items():
        parts.append(f"{fw}: AdamW {sv['learning_rate']:g}, backbone x{sv['backbone_multiplier']:g}, weight decay "
                     f"{sv['weight_decay']:g}, {sv['lr_scheduler_type']}" + (f" after {sv['warmup_steps']} warm-up steps"
                     if sv["warmup_steps"] else "") + (f", gradient clipping {sv['max_grad_norm']:g}"
                                                       if sv["max_grad_norm"] else ""))
    return "; ".join(parts)


def render_markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# OpenTrans in miniature: the paper's two tables", "",
             f"Command: `{results['command']}`", "",
             f"CLIP: `{s['clip']}`; dataset: the embedded procedural one (seen classes trained, held-out "
             f"classes evaluated zero-shot); fine-tuning steps per run: {_per_framework(s, 'framework_max_steps')}, "
             f"batch {s['batch_size']}; each framework's solver ({_solvers(s)}); seeds {s['seeds']}. mIoU in percent, mean ± sample std "
             f"over the seeds (one seed: no std). Noise rule: {NOISE_RULE}.", ""]
    if "table1" in results:
        t = results["table1"]
        p = t["pruning"]
        lines += ["## Table 1: subnetwork transfer", "",
                  f"One IMP mask (\"Ours\", {100 * p['sparsity']:.2f}% sparse after {p['rounds']} rounds) found on "
                  "the bare CLIP image encoder, applied unchanged to every framework; the Random mask has exactly "
                  "its per-layer sparsity (one per seed). Params and FLOPs: the CLIP image encoder, effective "
                  "(only kept weights count), FLOPs of one image.", "",
                  "The CLIP's own zero-shot: the row's CLIP (dense, or its original weights under the row's mask) with "
                  "no training at all, patch tokens against the class prompts, on the same embedded validation "
                  "split (what FC-CLIP's frozen out-of-vocabulary branch recognises with).", "",
                  "| framework | encoder | params | FLOPs | mIoU seen (%) | mIoU unseen (%) | the CLIP's own zero-shot "
                  "seen / unseen (%) | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for fw, rows in t["framework_rows"].items():
            for row in TABLE1_ROWS:
                r = rows[row]
                a = r["mean_std"]
                lines.append(f"| {fw} | {r['label']} | {si(a['effective_params']['mean'])} | "
                             f"{si(a['effective_inference_flops']['mean'])} | {_pm(a['mean_iou_seen'])} | "
                             f"{_pm(a['mean_iou_unseen'])} | {_pm(a['clip_zero_shot_seen'])} / "
                             f"{_pm(a['clip_zero_shot_unseen'])} | {a['mean_iou_seen']['n']} |")
        lines += ["", *[f"- {c['statement']}" for c in t["noise"]], ""]
    if "table2" in results:
        t = results["table2"]
        lines += ["## Table 2: efficient fine-tuning", "",
                  f"{t['framework']}, dense CLIP. The alpha row fine-tunes everything for {t['spectral_warmup_steps']} "
                  "warm-up steps, then measures alpha and freezes by the median rule. Training FLOPs: forward + "
                  "backward of the whole run (one step counted on a real batch, times the steps). Wall time per "
                  "step: measured on a shared CPU machine, noisy."
                  + (f" Full fine-tuning is the same run as table 1's dense {t['framework']} row." if t.get("full_is_table1_dense") else ""),
                  "",
                  "| method | trainable encoder params | training FLOPs | FLOPs vs full | time / step (ms) | "
                  "time vs full | mIoU seen (%) | mIoU unseen (%) | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in TABLE2_ROWS:
            r = t["rows"][row]
            a = r["mean_std"]
            fr, tr = a.get("flops_ratio_to_full"), a.get("time_ratio_to_full")
            lines.append(f"| {r['label']} | {si(a['trainable_encoder_params']['mean'])} | "
                         f"{si(a['training_flops']['mean'])} | {'-' if fr is None else f'{fr:.2f}'} | "
                         f"{_pm(a['seconds_per_step'], 1000, '{:.1f}')} | {'-' if tr is None else f'{tr:.2f}'} | "
                         f"{_pm(a['mean_iou_seen'])} | {_pm(a['mean_iou_unseen'])} | {a['mean_iou_seen']['n']} |")
        lines += ["", f"Trainable parameters: {t['trainable']}.", "",
                  *[f"- {c['statement']}" for c in t["noise"]], ""]
    lines.append(f"Took {results['seconds']['total']:.0f} s.")
    return "\n".join(lines) + "\n"


def _write_results(out: Path, results: dict, markdown: str) -> dict:
    paths = {"results_json": atomic_write_text(out / "results.json", json.dumps(json_safe(results), indent=2) + "\n"),
             "results_md": atomic_write_text(out / "results.md", markdown)}
    try:
        paths["plot"] = plot_results(out / "mIoU_vs_flops.png", results)
    except ImportError:
        print("plot skipped: matplotlib is not installed")
    return paths


def plot_results(path: Path, results: dict) -> Path:
    """The paper's Figure 1 in miniature: mIoU (unseen: filled, seen: hollow) against encoder inference FLOPs
    (table 1) and against training FLOPs (table 2), mean +- std over seeds."""
    panels = [k for k in ("table1", "table2") if k in results]
    fig = figure(figsize=(6.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)

    def point(ax, x, agg, label, color, marker):
        for key, fill in (("mean_iou_unseen", True), ("mean_iou_seen", False)):
            a = agg[key]
            if a["mean"] is None or x is None:
                continue
            ax.errorbar(x, 100 * a["mean"], yerr=100 * (a["std"] or 0), fmt=marker, color=color, capsize=3,
                        markerfacecolor=color if fill else "none", label=f"{label} ({key.split('_')[-1]})")

    colors = require_matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        if panel == "table1":
            markers = {"dense": "o", "random": "^", "ours": "*"}
            for j, (fw, rows) in enumerate(results["table1"]["framework_rows"].items()):
                for row in TABLE1_ROWS:
                    agg = rows[row]["mean_std"]
                    point(ax, agg["effective_inference_flops"]["mean"], agg, f"{fw} {rows[row]['label']}",
                          colors[j % len(colors)], markers[row])
            ax.set_xlabel("CLIP image encoder FLOPs per image (effective)")
            ax.set_title("Table 1: subnetwork transfer")
        else:
            for j, row in enumerate(TABLE2_ROWS):
                r = results["table2"]["rows"][row]
                point(ax, r["mean_std"]["training_flops"]["mean"], r["mean_std"], r["label"], colors[j % len(colors)], "o")
            ax.set_xlabel("training FLOPs of the run")
            ax.set_title(f"Table 2: efficient fine-tuning ({results['table2']['framework']})")
        ax.set_ylabel("mIoU (%)  filled: unseen, hollow: seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path
