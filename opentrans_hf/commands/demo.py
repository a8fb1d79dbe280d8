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

import argparse
import json
import statistics
import time
from pathlib import Path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from .training.trainer import FRAMEWORKS

    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="CLIP (Hub id or dir); default: random small CLIP built locally")
    p.add_argument("--dataset", default="embedded", help="training dataset (Hub name, save_to_disk dir, image/label folder, 'embedded')")
    p.add_argument("--eval_datasets", nargs="+", default=[], help="extra zero-shot evaluation datasets NAME[:SPLIT]")
    p.add_argument("--image_column", default=None, help="image column (default: detected)")
    p.add_argument("--label_column", default=None, help="label-map column (default: detected)")
    p.add_argument("--class_names", nargs="+", default=None, help="class names of --dataset, index = label value")
    p.add_argument("--id2label", default=None, help="JSON file {id: name} with the class names of --dataset")
    p.add_argument("--reduce_labels", action="store_true", help="label 0 -> ignore, others -1 (ADE20K)")
    p.add_argument("--holdout_classes", nargs="+", default=None,
                   help="classes left out of training, evaluated zero-shot ('none': train on all)")
    p.add_argument("--framework", default="deeplabv3", choices=FRAMEWORKS)
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--estimator", default="opentrans", choices=["opentrans", "ww"])
    p.add_argument("--freeze_rule", default="median", help="spectral tuning rule (median, ratio, threshold, top_k)")
    p.add_argument("--target_sparsity", type=float, default=0.9, help="sparsity of the pruned encoder (the paper's 0.9)")
    p.add_argument("--prune_rate", type=float, default=0.1, help="fraction of remaining weights pruned per round (the paper's 0.1)")
    p.add_argument("--prune_steps_per_round", type=int, default=10, help="distillation steps between rounds (paper: 5000)")
    p.add_argument("--max_steps", type=int, default=500, help="fine-tuning steps")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--embedded_size", type=int, default=192)
    p.add_argument("--max_eval_examples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> dict:
    from accelerate import PartialState
    from transformers import CLIPVisionModel

    from .distributed import cpu_only_multiprocess
    from .hub import load_or_explain, quiet_loading
    from .io import atomic_write_text, json_safe, read_json
    from .pruning import cli as prune_cli
    from .random_clip import clip_or_random
    from .spectral import analyze_spectra
    from .training.evaluation import results_table
    from .training.trainer import TrainArguments, run_training

    state = PartialState(cpu=cpu_only_multiprocess())
    out = Path(args.output_dir)
    t0 = time.time()
    clip = clip_or_random(args.model_name_or_path, out, args.seed, state)

    # 1. spectral analysis of the image encoder
    say = print if state.is_main_process else (lambda *a, **k: None)
    say(f"[1/4] spectral analysis ({args.estimator}) of the CLIP image encoder: {clip}")
    with quiet_loading():
        vision = load_or_explain(clip, lambda: CLIPVisionModel.from_pretrained(clip), "CLIP model")
    report = analyze_spectra(vision, estimator=args.estimator, keep_eigenvalues=True)
    paths = {}
    if state.is_main_process:
        paths["spectral_report"] = report.to_json(out / "spectral" / "report.json")
        try:
            paths["dense_alpha_plot"] = report.plot(out / "spectral" / "alpha.png")
        except ImportError as err:
            say(f"plot skipped: {err}")
    alphas = sorted(report.alphas.values())
    if alphas:
        say(f"{len(alphas)} layers analysed: alpha median {statistics.median(alphas):.2f}, "
            f"range {alphas[0]:.2f}-{alphas[-1]:.2f}")
    t_spectral = time.time() - t0

    # 2. semantic-agnostic IMP of the encoder -> mask adapter
    say(f"[2/4] iterative magnitude pruning to {args.target_sparsity:.0%} (rate {args.prune_rate}, "
        f"{args.prune_steps_per_round} distillation steps per round)")
    prune_args = prune_cli.build_parser().parse_args([
        "--model_name_or_path", clip, "--dataset", args.dataset, "--rate", str(args.prune_rate),
        "--target_sparsity", str(args.target_sparsity), "--steps_per_round", str(args.prune_steps_per_round),
        "--batch_size", str(args.batch_size), "--learning_rate", "1e-4", "--output_dir", str(out / "prune"),
        "--seed", str(args.seed), "--embedded_size", str(args.embedded_size),
        *(["--image_column", args.image_column] if args.image_column else []),
        *(["--label_column", args.label_column] if args.label_column else []),
    ])
    pruned = prune_cli.run(prune_args)
    t_prune = time.time() - t0 - t_spectral

    # 3 + 4. spectral fine-tuning of the framework with the mask applied, then evaluation
    say(f"[3/4] spectral fine-tuning ({args.freeze_rule} rule) of {args.framework} with the mask, {args.max_steps} steps")
    train_args = TrainArguments(
        model_name_or_path=clip, framework=args.framework, dataset=args.dataset, eval_datasets=list(args.eval_datasets),
        freeze_rule=args.freeze_rule, mask=pruned["mask"], max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, output_dir=str(out / "train"), seed=args.seed,
        embedded_size=args.embedded_size, max_eval_examples=args.max_eval_examples,
        image_column=args.image_column, label_column=args.label_column, class_names=args.class_names,
        id2label=args.id2label, reduce_labels=args.reduce_labels, holdout_classes=args.holdout_classes,
    )
    metrics = run_training(train_args)
    say("[4/4] evaluation (zero-shot on the held-out classes)")
    table = results_table(metrics["eval"])
    summary = {
        "clip": clip,
        "spectral": {"estimator": args.estimator, "layers": len(report.alphas),
                     "median_alpha": statistics.median(alphas) if alphas else None},
        "pruning": pruned,
        "training": {k: metrics[k] for k in ("framework", "steps", "train_seconds", "final_train_loss",
                                             "train_classes", "holdout_classes")},
        "eval": metrics["eval"],
        "seconds": {"spectral": round(t_spectral, 1), "prune": round(t_prune, 1), "total": round(time.time() - t0, 1)},
    }
    if state.is_main_process:
        paths["pruned_mask"] = Path(pruned["mask"])
        paths.update(read_json(out / "train" / "outputs.json", "training outputs"))  # written by run_training
        paths["summary"] = atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
        say("\n" + table)
        say(f"\nfinished in {summary['seconds']['total']:.0f} s; outputs:")
        for k, v in paths.items():
            say(f"  {k:17s} {v}")
    state.wait_for_everyone()
    return summary


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))
