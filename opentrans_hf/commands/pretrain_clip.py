"""Pretrain a small CLIP on the embedded dataset's captioned images (``opentrans-hf pretrain-clip``): a
CLIP checkpoint that really knows the class names, held-out ones included, for offline zero-shot work.
Runs under ``accelerate launch`` (data-parallel: every process draws its own batches) and plain ``python``:

    accelerate launch scripts/pretrain_clip.py --size small --output_dir runs/clip

Contrastive image-text loss (``CLIPModel(..., return_loss=True)``) plus two patch-level losses taken from
the captions alone (every patch is one of the classes the caption names; each named class is the most
likely class of some patch); segmentation labels are never used. Writes a normal CLIP checkpoint (config,
safetensors, tokenizer, ``pretraining.json``, and a model card with the measured training-free zero-shot
results) that ``from_pretrained`` and every job accept as ``--model_name_or_path``.

Without ``--output_dir`` it builds (or finds) the cached checkpoint the other jobs use by default:
``$OPENTRANS_HF_CACHE`` (default ``~/.cache/opentrans_hf``)/``pretrained-clip-<size>-seed<seed>-data-v<N>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


from opentrans_hf.commands import ArgumentError, check_at_least_one, check_output_dir, check_positive, claim
from opentrans_hf.commands.arguments import ProgressArguments
from opentrans_hf.training.outputs import OutputLayout
from opentrans_hf.training.pretraining import PRETRAINING_DEFAULTS, pretrain_clip, pretrained_clip
from opentrans_hf.utils.distributed import make_accelerator, make_state
from opentrans_hf.utils.io import read_json
from opentrans_hf.utils.locking import output_dir_lock


@dataclass
class PretrainClipArguments(ProgressArguments):
    size: Literal["tiny", "small"] = field(default="small", metadata={"help": "CLIP size: small (the jobs' default CLIP, a few minutes on 2 CPU cores) or tiny (tests)"})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, images, batches)"})
    output_dir: str | None = field(default=None, metadata={"help": "where to write the checkpoint (default: the cache entry the other jobs use, built only if missing)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: the size's recipe)"})
    batch_size: int | None = field(default=None, metadata={"help": "per-process batch size (default: the size's recipe)"})
    learning_rate: float | None = field(default=None, metadata={"help": "AdamW peak learning rate, cosine schedule (default: the size's recipe)"})
    num_examples: int | None = field(default=None, metadata={"help": "captioned images rendered for pretraining (default: the size's recipe)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a non-empty --output_dir (the checkpoint is the whole directory: everything in it is replaced once the new checkpoint is complete); without it such a directory is refused"})

    def __post_init__(self):
        check_at_least_one(self, "max_steps", "batch_size", "num_examples")
        recipe = PRETRAINING_DEFAULTS.get(self.size, {})
        batch, examples = self.batch_size or recipe.get("batch_size"), self.num_examples or recipe.get("num_examples")
        if batch is not None and examples is not None and batch > examples:
            raise ArgumentError(f"--batch_size {batch} is larger than --num_examples {examples} (each batch draws "
                                "distinct images)")
        check_positive("learning_rate", self.learning_rate)
        check_output_dir(self)
        if self.overwrite_output_dir and self.output_dir is None:
            raise ArgumentError("--overwrite_output_dir needs --output_dir (the cached default CLIP is never replaced)")
        custom = [n for n in ("max_steps", "batch_size", "learning_rate", "num_examples") if getattr(self, n) is not None]
        if custom and self.output_dir is None:
            raise ArgumentError(f"{', '.join('--' + n for n in custom)} change the recipe: give --output_dir (the "
                                "cache holds the default recipe only)")


ARGUMENTS = PretrainClipArguments

PRETRAIN_LAYOUT = OutputLayout("pretrain-clip", ("*",))
"""The checkpoint is the whole --output_dir (it replaces the directory once complete): anything in it counts."""


def run(args: PretrainClipArguments) -> dict:
    """Pretrain (or, without ``--output_dir`` and with the default recipe, find the cached build) and
    print the zero-shot results; returns the pretraining record."""
    if args.output_dir is None:
        state = make_state()
        path = pretrained_clip(args.size, args.seed, state=state, progress=not args.no_progress)
        record = read_json(path / "pretraining.json", "pretraining record")
        if not state.is_main_process:
            return record
    else:
        accelerator = make_accelerator()
        path = Path(args.output_dir)
        with output_dir_lock(path, accelerator, "pretrain-clip"):  # the finished checkpoint replaces the directory
            claim(path, PRETRAIN_LAYOUT, overwrite=args.overwrite_output_dir, state=accelerator)
            record = pretrain_clip(path, args.size, args.seed, max_steps=args.max_steps, batch_size=args.batch_size,
                                   learning_rate=args.learning_rate, num_examples=args.num_examples,
                                   accelerator=accelerator,  # its device: a GPU when there is one
                                   progress=not args.no_progress)
        if not accelerator.is_main_process:
            return record
        record = read_json(path / "pretraining.json", "pretraining record")
    zs = record["zero_shot"]
    print(f"pretrained CLIP ({record['size']}, seed {record['seed']}, {record['max_steps']} steps, "
          f"{record['train_seconds']:.0f} s): {path}")
    print(f"zero-shot, training-free, on {zs['examples']} embedded validation images: dense mIoU "
          f"{100 * zs['dense_mean_iou']:.2f} (held-out classes {100 * zs['dense_mean_iou_unseen']:.2f}), "
          f"image-level presence accuracy {100 * zs['presence_accuracy']:.2f} "
          f"(held-out {100 * zs['presence_accuracy_unseen']:.2f})")
    record["path"] = str(path)
    print(json.dumps({"path": str(path), "zero_shot": {k: v for k, v in zs.items() if k != "dense_per_category_iou"}}))
    return record
