"""Zero-shot evaluation of a trained OVS model on several datasets, each with its own class names, in
one table (mIoU, pixel accuracy, seen/unseen mIoU). Runs under ``accelerate launch`` (the confusion
matrices are summed across processes) and plain ``python``:

    accelerate launch scripts/evaluate.py --model runs/demo/train/model \
        --datasets embedded:validation scene_parse_150:validation
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..hub import check_local_or_hub
from . import ArgumentError


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "trained framework: output_dir/model of a training run, or a Hub id"})
    datasets: list[str] = field(default_factory=lambda: ["embedded:validation"], metadata={"help": "NAME[:SPLIT] each: 'embedded', a Hub dataset, a save_to_disk dir or an image/label folder"})
    class_names: list[str] | None = field(default=None, metadata={"help": "class names (all datasets without names of their own)"})
    id2label: str | None = field(default=None, metadata={"help": "JSON file {id: name} (same)"})
    reduce_labels: bool = field(default=False, metadata={"help": "label 0 -> ignore, others -1 (ADE20K)"})
    image_size: int | None = field(default=None, metadata={"help": "evaluation resolution (default: the model's)"})
    batch_size: int = field(default=8, metadata={"help": "per-process batch size"})
    max_examples: int | None = field(default=None, metadata={"help": "cap on examples per dataset"})
    embedded_size: int = field(default=192, metadata={"help": "examples in the embedded dataset's train split"})
    seed: int = field(default=0, metadata={"help": "random seed (embedded dataset)"})
    out: str | None = field(default=None, metadata={"help": "write the results as JSON here (and the table beside it as .md)"})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ArgumentError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ArgumentError(f"--max_examples must be >= 1 when given, got {self.max_examples}")
        check_local_or_hub(self.model, "--model")


ARGUMENTS = EvaluateArguments


def run(args: EvaluateArguments) -> dict:
    from transformers import AutoModel

    from ..distributed import make_accelerator
    from ..frameworks import FRAMEWORKS  # noqa: F401  (registers the frameworks with AutoModel)
    from ..hub import load_or_explain
    from ..io import atomic_write_text, json_safe
    from ..data.assembly import load_split, parse_split_spec
    from ..training.evaluation import evaluate_splits, results_table

    accelerator = make_accelerator()
    model = load_or_explain(args.model, lambda: AutoModel.from_pretrained(args.model), "OVS model")
    if not hasattr(model, "predict"):
        raise ValueError(f"{args.model} is a {type(model).__name__}, not an opentrans-hf OVS framework")
    from ..training.divergence import check_finite_weights

    check_finite_weights(model, f"model {args.model}")  # a diverged model's mIoU would be meaningless
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
