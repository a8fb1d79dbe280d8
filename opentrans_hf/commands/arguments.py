"""The arguments the jobs share, each declared once, in groups: the CLIP (:class:`ClipArguments`), the OVS
framework (:class:`FrameworkArguments`), the training dataset (:class:`DatasetArguments`), the embedded
dataset's size (:class:`EmbeddedArguments`), a run's batch and seed (:class:`RunArguments`) and the progress bar (:class:`ProgressArguments`).

A job's arguments dataclass inherits the groups it takes and declares its own fields after them::

    @dataclass
    class TrainArguments(RunArguments, DatasetArguments, FrameworkArguments, ClipArguments):
        num_epochs: float = field(default=3.0, metadata={"help": ...})

Dataclass inheritance puts the groups' fields first (the last base listed first), then the job's own;
``HfArgumentParser`` makes one ``--flag`` of each. A job whose field means something else there (another
default, another help) declares that field itself (it keeps the group's position in ``--help``). A job's
own required fields are keyword-only (``kw_only=True``): they follow the groups' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opentrans_hf.data.assembly import EMBEDDED

FRAMEWORKS = ("deeplabv3", "mask2former", "fcclip")
Framework = Literal[FRAMEWORKS]


@dataclass
class ClipArguments:
    """The CLIP a job starts from (train, demo, prune, reproduce)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP checkpoint: Hub id or local dir. Default: the pretrained embedded CLIP (opentrans-hf pretrain-clip; built once, cached); no weights are downloaded."})


@dataclass
class FrameworkArguments:
    """The OVS framework built around the CLIP (train, demo)."""

    framework: Framework = field(default="deeplabv3", metadata={"help": "OVS framework"})
    config_overrides: str | None = field(default=None, metadata={"help": "framework config settings, 'key=value,key=value' as transformers' PretrainedConfig.update_from_string reads them, e.g. 'clip_residual=true,aspp_channels=128' (see the framework's config class)"})


@dataclass
class DatasetArguments:
    """The training dataset, how to read it, what is held out and what else is evaluated (train, demo)."""

    dataset: str = field(default=EMBEDDED, metadata={"help": "training data: Hub dataset name, a local copy of a Hub dataset repo (parquet shards), save_to_disk dir, image/label folder, or 'embedded' (procedural)"})
    eval_datasets: list[str] = field(default_factory=list, metadata={"help": "extra zero-shot evaluation datasets, each a spec: NAME[:SPLIT] (a dataset with class names of its own) or a .json file with its class names and label conventions (see `opentrans-hf evaluate --help`)"})
    image_column: str | None = field(default=None, metadata={"help": "image column of --dataset (default: detected)"})
    label_column: str | None = field(default=None, metadata={"help": "label-map column of --dataset (default: detected)"})
    class_names: list[str] | None = field(default=None, metadata={"help": "class names of --dataset, index = label value"})
    id2label: str | None = field(default=None, metadata={"help": "JSON file {id: name} with the class names of --dataset"})
    holdout_classes: list[str] | None = field(default=None, metadata={"help": "classes left out of training (labels ignored), evaluated zero-shot ('none': train on all). Default for the embedded dataset: its held-out classes"})
    reduce_labels: bool = field(default=False, metadata={"help": "label 0 -> ignore, others -1 (ADE20K), for --dataset"})
    ignore_index: int | None = field(default=None, metadata={"help": "label value of unlabelled pixels in --dataset (default: 255, or the benchmark's)"})
    benchmark: str | None = field(default=None, metadata={"help": "train on a standard benchmark (opentrans-hf benchmarks), e.g. coco_panoptic133: its class names with synonyms and label conventions; its Hub copy unless --dataset gives the data (a prepare-dataset directory or the raw form)"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "cap on evaluation examples per dataset"})


@dataclass
class EmbeddedArguments:
    """The size of the embedded dataset, for a job that may read it (train, demo, prune, evaluate, reproduce)."""

    embedded_size: int = field(default=192, metadata={"help": "examples in the embedded dataset's train split"})


@dataclass
class RunArguments(EmbeddedArguments):
    """A run's batch and seed, with the embedded dataset's size (train, demo, prune, evaluate)."""

    batch_size: int = field(default=8, metadata={"help": "per-process batch size"})
    seed: int = field(default=0, metadata={"help": "random seed"})


@dataclass
class ProgressArguments:
    """The progress bar (analyze, pretrain-clip, prepare-dataset)."""

    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})
