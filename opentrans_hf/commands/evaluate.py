"""``scripts/evaluate.py`` / ``opentrans-hf evaluate``: zero-shot evaluation of a trained OVS model on
several datasets, each with its own class names, in one table (any number of processes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="trained framework: output_dir/model of a training run, or a Hub id")
    p.add_argument("--datasets", nargs="+", default=["embedded:validation"],
                   help="NAME[:SPLIT] each: 'embedded', a Hub dataset, a save_to_disk dir or an image/label folder")
    p.add_argument("--class_names", nargs="+", default=None, help="class names (all datasets without names of their own)")
    p.add_argument("--id2label", default=None, help="JSON file {id: name} (same)")
    p.add_argument("--reduce_labels", action="store_true", help="label 0 -> ignore, others -1 (ADE20K)")
    p.add_argument("--image_size", type=int, default=None, help="evaluation resolution (default: the model's)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_examples", type=int, default=None, help="cap per dataset")
    p.add_argument("--embedded_size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here (and the table beside it as .md)")
    return p


def run(args) -> dict:
    from transformers import AutoModel

    from ..distributed import make_accelerator
    from ..frameworks import FRAMEWORKS  # noqa: F401  (registers the frameworks with AutoModel)
    from ..hub import load_or_explain
    from ..io import atomic_write_text, json_safe
    from .evaluation import evaluate_splits, results_table
    from .trainer import load_split, parse_split_spec

    accelerator = make_accelerator()
    model = load_or_explain(args.model, lambda: AutoModel.from_pretrained(args.model), "OVS model")
    if not hasattr(model, "predict"):
        raise ValueError(f"{args.model} is a {type(model).__name__}, not an opentrans-hf OVS framework")
    model.to(accelerator.device)
    size = args.image_size or model.config.image_size
    splits = {}
    for spec in args.datasets:
        name, split = parse_split_spec(spec)
        splits[f"{name}:{split}"] = load_split(
            name, split, size, seed=args.seed, embedded_size=args.embedded_size, class_names=args.class_names,
            id2label=args.id2label, reduce_labels=args.reduce_labels)
    results = evaluate_splits(model, splits, seen_classes=model.config.seen_class_names, batch_size=args.batch_size,
                              accelerator=accelerator, max_examples=args.max_examples)
    table = results_table(results)
    if accelerator.is_main_process:
        print(table)
        if args.out:
            out = Path(args.out)
            atomic_write_text(out, json.dumps(json_safe({"model": args.model, "results": results}), indent=2) + "\n")
            atomic_write_text(out.with_suffix(".md"), table + "\n")
            print(f"results written to {out} and {out.with_suffix('.md')}")
    accelerator.wait_for_everyone()
    return results


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))
