"""List the standard open-vocabulary segmentation benchmarks the jobs know by name (``--benchmark NAME``,
``--datasets NAME``): classes, label conventions (raw and prepared), Hub copy, evaluation resolution.

    opentrans-hf benchmarks                 # one line each
    opentrans-hf benchmarks --names ade150  # its classes with their synonyms, in label order
    opentrans-hf benchmarks --json          # everything as JSON

Class lists are those of the field's evaluation code (FC-CLIP's / OpenSeg's, with synonyms), so results
compare with published numbers. Benchmarks without a Hub copy are prepared from their official release
with `opentrans-hf prepare-dataset NAME --raw_dir DIR --output_dir OUT`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from opentrans_hf.commands import ArgumentError
from opentrans_hf.data.benchmarks import get_benchmark, list_benchmarks


@dataclass
class BenchmarksArguments:
    names: list[str] | None = field(default=None, metadata={"help": "show these benchmarks with their classes and synonyms (default: all, one line each)"})
    json: bool = field(default=False, metadata={"help": "print JSON (every field, class lists included)"})

    def __post_init__(self):
        for name in self.names or []:
            try:
                get_benchmark(name)
            except ValueError as err:
                raise ArgumentError(str(err)) from err


ARGUMENTS = BenchmarksArguments


def as_record(bench) -> dict:
    """A benchmark as a JSON-ready dict."""
    hub = None
    if bench.hub is not None:
        hub = {"repo_id": bench.hub.repo_id, "revision": bench.hub.revision, "data_dir": bench.hub.data_dir,
               "image_column": bench.hub.image_column, "label_column": bench.hub.label_column}
    return {"name": bench.name, "title": bench.title, "role": bench.role, "num_classes": bench.num_classes,
            "class_names": bench.class_names, "synonyms": [list(s) for s in bench.synonyms],
            "raw_ids": list(bench.raw_ids), "label_bits": bench.label_bits,
            "raw": {"reduce_labels": bench.raw_reduce_labels, "ignore_index": bench.raw_ignore_index},
            "prepared": {"reduce_labels": False, "ignore_index": bench.prepared_ignore_index},
            "hub": hub, "eval_split": bench.eval_split,
            "eval_resize": {"shortest_side": bench.shortest_side, "max_size": bench.max_size},
            "raw_layout": bench.raw_layout, "notes": bench.notes}


def run(args: BenchmarksArguments) -> list[dict]:
    chosen = [get_benchmark(n) for n in args.names] if args.names else list_benchmarks()
    records = [as_record(b) for b in chosen]
    if args.json:
        print(json.dumps(records, indent=2))
    elif args.names:
        for b in chosen:
            print(b.describe())
            print(f"  raw layout: {b.raw_layout}")
            if b.notes:
                print(f"  notes: {b.notes}")
            for i, (name, syn) in enumerate(zip(b.class_names, b.synonyms)):
                others = [s for s in syn if s != name]
                print(f"  {i:>4} {name}" + (f"  ({', '.join(others)})" if others else ""))
    else:
        for b in chosen:
            print(b.describe())
    return records
