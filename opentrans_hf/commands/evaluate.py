"""Zero-shot evaluation of a trained OVS model on several datasets, each with its own class names and
label conventions, in one table (vocabulary, mIoU, pixel accuracy, seen/unseen mIoU, in percent). Runs
under ``accelerate launch`` (the confusion matrices are summed across processes) and plain ``python``:

    accelerate launch scripts/evaluate.py --model runs/demo/train/model \\
        --datasets embedded:validation /data/ade20k:validation pc59.json

Each --datasets entry is a dataset spec:

  NAME[:SPLIT]  a dataset that carries its own class names: 'embedded', a benchmark name (ade150, ...: its
                Hub copy with its names, synonyms and label conventions; `opentrans-hf benchmarks`), a
                directory written by `opentrans-hf prepare-dataset`, a save_to_disk directory or
                image/label folder with an id2label.json in it, a Hub dataset whose repo has one, or a
                label column with a ClassLabel feature. SPLIT defaults to 'validation'.
  --benchmark NAME ...  the same as --datasets NAME:validation for each (beside any --datasets).
  FILE.json     one JSON object for any other dataset, e.g.
                {"dataset": "/data/pascal_context", "split": "validation", "id2label": "pc59_id2label.json",
                 "reduce_labels": false, "ignore_index": 255, "label_column": "label", "name": "pc59"}
                keys: dataset (or benchmark: the data is that benchmark in its raw form), split, name (the
                row), one of id2label ({id: name} or a JSON
                file) / class_names (a list) / vocabulary (a named benchmark vocabulary), reduce_labels,
                ignore_index (the dataset's value for unlabelled pixels), image_column, label_column.
                Relative paths are relative to the spec file.

--class_names / --id2label / --reduce_labels / --ignore_index / --image_column / --label_column describe
a single NAME[:SPLIT] dataset; with several datasets (or a spec file) they are an error: each dataset's
conventions go in its own spec file. The --out JSON holds the metrics as fractions of 1 (keys as the
Hub's mean_iou metric: mean_iou, overall_accuracy, per_category_iou, ...); the tables show percent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoModel

from opentrans_hf.commands import (
    ArgumentError,
    check_at_least_one,
    check_local_paths,
    check_output_file,
    check_prompt_templates,
)
from opentrans_hf.commands.arguments import RunArguments
from opentrans_hf.data.assembly import load_eval_splits
from opentrans_hf.data.benchmarks import get_benchmark
from opentrans_hf.data.specs import parse_dataset_spec
from opentrans_hf.training.cost import cost_table, evaluation_cost, load_model_mask
from opentrans_hf.training.divergence import check_finite_weights
from opentrans_hf.training.evaluation import METRIC_UNITS, evaluate_splits, resolve_eval_resize, results_table
from opentrans_hf.utils.distributed import make_accelerator, on_main_process
from opentrans_hf.utils.hub import load_or_explain
from opentrans_hf.utils.io import atomic_write_text, json_safe


@dataclass
class EvaluateArguments(RunArguments):
    model: str = field(kw_only=True, metadata={"help": "trained framework: output_dir/model of a training run, or a Hub id"})
    datasets: list[str] | None = field(default=None, metadata={"help": "dataset specs, each NAME[:SPLIT] (a dataset with class names of its own: 'embedded', a benchmark name, a prepared benchmark directory, a Hub dataset or a local copy of its repo, a save_to_disk dir or an image/label folder) or a .json spec file with its class names and label conventions (see above). Default: embedded:validation, unless --benchmark is given"})
    benchmark: list[str] | None = field(default=None, metadata={"help": "standard benchmarks to evaluate on, by name (opentrans-hf benchmarks lists them): each its Hub copy with its class names, synonyms, label conventions and the field's evaluation protocol (a benchmark without a Hub copy: prepare it with opentrans-hf prepare-dataset and give the directory in --datasets)"})
    class_names: list[str] | None = field(default=None, metadata={"help": "class names, index = label value (one NAME[:SPLIT] dataset only)"})
    id2label: str | None = field(default=None, metadata={"help": "JSON file {id: name} with the class names (one NAME[:SPLIT] dataset only)"})
    reduce_labels: bool = field(default=False, metadata={"help": "label 0 -> ignore, others -1 (ADE20K) (one NAME[:SPLIT] dataset only)"})
    ignore_index: int | None = field(default=None, metadata={"help": "the dataset's label value for unlabelled pixels; default 255 (one NAME[:SPLIT] dataset only)"})
    image_column: str | None = field(default=None, metadata={"help": "image column; default: detected (one NAME[:SPLIT] dataset only)"})
    label_column: str | None = field(default=None, metadata={"help": "label-map column; default: detected (one NAME[:SPLIT] dataset only)"})
    image_size: int | None = field(default=None, metadata={"help": "evaluation resolution (default: the model's)"})
    max_examples: int | None = field(default=None, metadata={"help": "cap on examples per dataset"})
    seed: int = field(default=0, metadata={"help": "random seed (embedded dataset)"})
    out: str | None = field(default=None, metadata={"help": "write the results as JSON here (metrics as fractions of 1) and the table (percent) beside it as .md"})
    eval_resize: str | None = field(default=None, metadata={"choices": ["square", "shortest_side"], "help": "square: image and label resized to --image_size x --image_size; shortest_side: the field's protocol (shorter side --shortest_side, longer at most --max_size, sliding --image_size windows, scored at the label's original size). Default: shortest_side for benchmark datasets (with the benchmark's sizes) or when --shortest_side / --max_size are given, else square"})
    shortest_side: int | None = field(default=None, metadata={"help": "shortest_side protocol: the images' shorter side (default: the benchmark's, else 800)"})
    max_size: int | None = field(default=None, metadata={"help": "shortest_side protocol: cap on the longer side (default: the benchmark's, else 1333)"})
    sliding_stride: int | None = field(default=None, metadata={"help": "shortest_side protocol: pixels between sliding windows (default: 2/3 of the window, as mmsegmentation)"})
    prompt_templates: str | None = field(default=None, metadata={"help": "score the class names with this prompt-template set instead of the model's: 'fcclip' (FC-CLIP's 14 evaluation templates) or 'default' (the 4 the frameworks start with)"})

    def __post_init__(self):
        check_at_least_one(self, "batch_size", "max_examples", "shortest_side", "max_size", "sliding_stride",
                           "image_size", "embedded_size")
        check_output_file("out", self.out, not_suffixes=(".md",))
        if self.eval_resize == "square" and (self.shortest_side or self.max_size or self.sliding_stride):
            raise ArgumentError("--shortest_side / --max_size / --sliding_stride set the shortest_side protocol; they do not "
                                "apply with --eval_resize square")
        if self.shortest_side and self.max_size and self.max_size < self.shortest_side:
            raise ArgumentError(f"--max_size {self.max_size} is smaller than --shortest_side {self.shortest_side}")
        check_prompt_templates(self)
        check_local_paths(self, "model")
        self.dataset_specs()  # a bad spec fails here, before any model is loaded

    def dataset_specs(self) -> list:
        """The :class:`~opentrans_hf.data.specs.DatasetSpec` of every --datasets entry (the global label
        flags folded into a single NAME[:SPLIT] spec; anywhere else they are an error)."""
        specs = []
        texts = list(self.datasets or ([] if self.benchmark else ["embedded:validation"]))
        for name in self.benchmark or []:
            try:
                bench = get_benchmark(name)
            except ValueError as err:
                raise ArgumentError(f"--benchmark: {err}") from err
            texts.append(f"{bench.name}:{bench.eval_split}")
        for text in texts:
            try:
                specs.append(parse_dataset_spec(text))
            except ValueError as err:
                raise ArgumentError(str(err)) from err
        given = {flag: value for flag, value in (
            ("--class_names", self.class_names), ("--id2label", self.id2label), ("--reduce_labels", self.reduce_labels or None),
            ("--ignore_index", self.ignore_index), ("--image_column", self.image_column),
            ("--label_column", self.label_column)) if value is not None}
        if given:
            if len(specs) != 1 or specs[0].is_file:
                where = (f"{len(specs)} datasets" if len(specs) != 1 else f"the spec file {specs[0].origin}")
                raise ArgumentError(
                    f"{' / '.join(given)} apply to a single NAME[:SPLIT] dataset only, but --datasets has {where}: give each "
                    "dataset that needs them a .json spec file of its own (e.g. {\"dataset\": ..., \"split\": ..., "
                    "\"id2label\": ..., \"reduce_labels\": ...}; see --help)")
            specs[0] = replace(specs[0], class_names=self.class_names, id2label=self.id2label,
                               reduce_labels=self.reduce_labels, ignore_index=self.ignore_index,
                               image_column=self.image_column, label_column=self.label_column)
        rows = [s.row_name for s in specs]
        twice = sorted({r for r in rows if rows.count(r) > 1})
        if twice:
            raise ArgumentError(f"--datasets names {twice} twice; give each its own row name (\"name\" in a .json spec file)")
        return specs


ARGUMENTS = EvaluateArguments


def run(args: EvaluateArguments) -> dict:
    accelerator = make_accelerator()
    model = load_or_explain(args.model, lambda: AutoModel.from_pretrained(args.model), "OVS model")
    if not hasattr(model, "predict"):
        raise ValueError(f"{args.model} is a {type(model).__name__}, not an opentrans-hf OVS framework")
    check_finite_weights(model, f"model {args.model}")  # a diverged model's mIoU would be meaningless
    if args.prompt_templates:
        model.set_prompt_templates(args.prompt_templates)
    model.to(accelerator.device)
    size = args.image_size or model.config.image_size
    specs = args.dataset_specs()
    splits = load_eval_splits(specs, size, seed=args.seed, embedded_size=args.embedded_size)
    for spec in specs:  # the evaluation protocol of each dataset: square, or the field's (benchmarks' default)
        split = splits[spec.row_name]
        bench = getattr(spec, "benchmark", None) or getattr(split, "benchmark", None)
        resize, side, cap = resolve_eval_resize(bench, args.eval_resize, args.shortest_side, args.max_size)
        if resize == "shortest_side":
            split.use_eval_resize("shortest_side", side, cap)
    timing = {}
    results = evaluate_splits(model, splits, seen_classes=model.config.seen_class_names, batch_size=args.batch_size,
                              accelerator=accelerator, max_examples=args.max_examples, window=size,
                              stride=args.sliding_stride, timing=timing)

    def cost_of_evaluation():  # parameters, FLOPs per image, throughput (the main process's own shard)
        mask, mask_path = load_model_mask(args.model)
        return evaluation_cost(model, splits, timing, batch_size=args.batch_size, device=accelerator.device, mask=mask,
                               mask_path=mask_path)

    cost = on_main_process(accelerator, cost_of_evaluation)
    table = results_table(results)

    def report() -> None:  # the main process alone; a failure (e.g. writing --out) stops every process
        costs = cost_table(cost)
        print(table)
        print()
        print(costs)
        if args.out:
            out = Path(args.out)
            record = {"model": args.model, "units": METRIC_UNITS,
                      "results": results, "cost": cost}
            atomic_write_text(out, json.dumps(json_safe(record), indent=2) + "\n")
            atomic_write_text(out.with_suffix(".md"), table + "\n")
            cost_md = out.with_name(out.stem + "_cost.md")
            atomic_write_text(cost_md, costs + "\n")
            print(f"results written to {out}, {out.with_suffix('.md')} and {cost_md}")

    on_main_process(accelerator, report)
    return results
