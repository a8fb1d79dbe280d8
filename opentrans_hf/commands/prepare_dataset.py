"""Convert a benchmark's official release into a dataset with its conventions and vocabulary:

    opentrans-hf prepare-dataset ade150 --raw_dir /data --output_dir prepared/ade150
    opentrans-hf evaluate --model runs/demo/train/model --datasets prepared/ade150:validation

NAME is one of the benchmarks `opentrans-hf benchmarks` lists; --raw_dir is the folder that holds the
release's top folder (e.g. the parent of ADEChallengeData2016) or that folder itself; for a benchmark with
a Hub copy (ade150), it may also be a local copy of that Hub dataset repo (the root of a download of
scene_parse_150's refs/convert/parquet, holding scene_parsing/{train,validation}/*.parquet, or the
scene_parsing folder itself):

    opentrans-hf prepare-dataset ade150 --raw_dir scene_parse_150 --output_dir prepared/ade150

The output is a
save_to_disk DatasetDict (columns image, label; label i = class i, everything else 255, or 65535 for
the 16-bit ade847 / pc459) with id2label.json and benchmark.json beside it, so evaluation needs no
label flags. It is written atomically: a failed or killed run leaves no half-written --output_dir.
An existing non-empty --output_dir is refused (exit status 2) unless --overwrite is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opentrans_hf.commands import ArgumentError, check_at_least_one
from opentrans_hf.commands.arguments import ProgressArguments
from opentrans_hf.data.benchmarks.prepare import SPLITS, prepare_benchmark
from opentrans_hf.data.benchmarks.registry import get_benchmark
from opentrans_hf.utils.locking import LOCK_NAME, output_dir_lock


@dataclass
class PrepareDatasetArguments(ProgressArguments):
    benchmark: str = field(kw_only=True, metadata={"help": "the benchmark: coco_panoptic133, coco_stuff171, ade150, ade847, pc59, "
                                             "pc459, voc20, voc21, cityscapes19 (may also be given as the first "
                                             "positional argument)"})
    raw_dir: str = field(kw_only=True, metadata={"help": "folder holding the official release's top folder (e.g. the parent of "
                                           "ADEChallengeData2016), or that folder itself; for ade150 also a local copy "
                                           "of its Hub dataset scene_parse_150 (the repo's root holding "
                                           "scene_parsing/{train,validation}/*.parquet, or that scene_parsing folder)"})
    output_dir: str = field(kw_only=True, metadata={"help": "where to write the prepared DatasetDict (save_to_disk), "
                                              "id2label.json and benchmark.json"})
    splits: list[str] = field(default_factory=lambda: ["validation"], metadata={"help": "splits to prepare: validation and/or train (ADE training/validation, VOC and Pascal Context train/val lists, COCO train2017/val2017, Cityscapes train/val)"})
    max_examples: int | None = field(default=None, metadata={"help": "at most this many examples per split (the first ones, in file order), for quick trials"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty --output_dir (it is replaced only once the new dataset is complete)"})

    def __post_init__(self):
        try:
            self.benchmark = get_benchmark(self.benchmark).name
        except ValueError as err:
            raise ArgumentError(str(err)) from None
        check_at_least_one(self, "max_examples")
        if isinstance(self.splits, str):
            self.splits = [self.splits]
        self.splits = list(dict.fromkeys(self.splits))
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ArgumentError(f"--splits must be among {list(SPLITS)}, got {self.splits}")
        raw = Path(self.raw_dir).expanduser()
        if not raw.is_dir():
            raise ArgumentError(f"--raw_dir {self.raw_dir}: no such directory")
        out = Path(self.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ArgumentError(f"--output_dir {self.output_dir} is a file, not a directory")
        if self.overwrite and _inside(raw, out):
            raise ArgumentError(f"--raw_dir {self.raw_dir} is inside --output_dir {self.output_dir}: --overwrite would "
                                "delete the raw data; choose another --output_dir")
        if not self.overwrite and _nonempty(out):
            raise ArgumentError(existing_output_message(out))


ARGUMENTS = PrepareDatasetArguments


def preprocess_argv(argv: list[str]) -> list[str]:
    """``prepare-dataset NAME ...``: the benchmark may come first, without ``--benchmark``."""
    if argv and not argv[0].startswith("-"):
        return ["--benchmark", argv[0], *argv[1:]]
    return argv


def existing_output_message(out: Path) -> str:
    return f"--output_dir {out} exists and is not empty: pass --overwrite to replace it, or choose another --output_dir"


def _nonempty(out: Path) -> bool:
    """``out`` holds something other than a run's lock file."""
    return out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def run(args: PrepareDatasetArguments) -> dict:
    """Convert, write atomically (holding the output directory's lock), print a summary; returns the
    record written to ``benchmark.json``."""
    out = Path(args.output_dir).expanduser()
    with output_dir_lock(out, None, "prepare-dataset"):  # the finished dataset replaces the directory
        if not args.overwrite and _nonempty(out):  # filled since the arguments were checked
            raise FileExistsError(existing_output_message(out))
        record = prepare_benchmark(args.benchmark, Path(args.raw_dir).expanduser(), out, args.splits,
                                   max_examples=args.max_examples, progress=not args.no_progress)
    counts = ", ".join(f"{s} {n}" for s, n in record["num_examples"].items())
    print(f"prepared {record['title']} ({record['num_classes']} classes, {record['label_bits']}-bit labels, ignore "
          f"{record['ignore_index']}): {counts} examples -> {out}")
    print(f"evaluate with: opentrans-hf evaluate --model MODEL --datasets {out}:{record['splits'][0]}")
    return record
