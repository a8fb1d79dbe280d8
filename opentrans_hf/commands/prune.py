"""Semantic-agnostic iterative magnitude pruning of a CLIP image encoder (OpenTrans step 1) -> a binary
mask adapter. Runs under ``accelerate launch`` (any number of processes) and plain ``python``:

    accelerate launch scripts/prune.py --model_name_or_path openai/clip-vit-base-patch16 \
        --dataset <hf segmentation dataset or dir> --num_rounds 22 --steps_per_round 5000 --output_dir runs/prune

Defaults run on the embedded procedural dataset with the pretrained embedded CLIP (``opentrans-hf
pretrain-clip``: built once on first use and cached; no downloads).
Writes <output_dir>/round_XX/ (the mask adapter after every round; an interrupted run resumes), the
final mask in <output_dir>/mask/, its per-layer sparsity plot, and params/MACs in <output_dir>/counts.json.
With the embedded dataset it also measures the pruned CLIP's own training-free dense zero-shot (the
original CLIP weights with the final mask, what transfers) beside the dense CLIP's: in the result and
counts.json under "zero_shot", in the mask's extra and its model card (:func:`pruned_zero_shot`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate.utils import set_seed
from transformers import AutoConfig, AutoTokenizer, CLIPModel, CLIPVisionModel

from opentrans_hf.commands import (
    OVERWRITE_HELP,
    ArgumentError,
    check_at_least_one,
    check_fraction,
    check_local_paths,
    check_non_negative,
    check_output_dir,
    check_percentage,
    check_positive,
    claim,
)
from opentrans_hf.commands.arguments import ClipArguments, RunArguments
from opentrans_hf.data.assembly import distillation_split, make_loader
from opentrans_hf.methods.sparse_mask.counting import count_params_and_flops
from opentrans_hf.methods.sparse_mask.imp import IMPConfig, iterative_magnitude_prune
from opentrans_hf.methods.sparse_mask.magnitude import check_max_layer_sparsity
from opentrans_hf.training.outputs import OutputLayout
from opentrans_hf.training.pretraining import default_clip, zero_shot_evaluation
from opentrans_hf.utils.distributed import make_accelerator, on_main_process
from opentrans_hf.utils.hub import is_offline, load_or_explain, quiet_loading
from opentrans_hf.utils.io import atomic_write_text
from opentrans_hf.utils.locking import output_dir_lock


@dataclass
class PruneArguments(RunArguments, ClipArguments):
    dataset: str = field(default="embedded", metadata={"help": "Hub dataset, a local copy of a Hub dataset repo, save_to_disk dir, image/label folder, or 'embedded'"})
    split: str = field(default="train", metadata={"help": "split of --dataset to distil on"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: detected)"})
    label_column: str | None = field(default=None, metadata={"help": "label-map column for the region-level loss (default: detected; none: image-level only)"})
    validation_split_percentage: float | None = field(default=None, metadata={"help": "leave out the part of --split that train's --validation_split_percentage (same value and --seed) evaluates on"})
    rate: float = field(default=0.1, metadata={"help": "fraction of the remaining weights pruned per round (the paper's 0.1)"})
    num_rounds: int | None = field(default=None, metadata={"help": "rounds (default: enough for --target_sparsity, else 22)"})
    target_sparsity: float | None = field(default=None, metadata={"help": "stop at the first round reaching this sparsity"})
    steps_per_round: int = field(default=5000, metadata={"help": "distillation steps between rounds (the paper's 5000)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the distillation"})
    scope: Literal["global", "layerwise", "alpha", "random", "structured", "structured-layerwise", "2:4"] = field(default="global", metadata={"help": "magnitude ranking: global (the paper), per layer, or alpha-allocated; random: the paper's Random baseline, a random mask of the same sparsity drawn by --seed (nested across rounds); structured: whole attention heads and MLP neurons (importance: L1 / weights of the unit, ranked globally; structured-layerwise: the same fraction of each layer's units), a mask that SparseMask.compact turns into a smaller model; 2:4: one round keeping 2 of every 4 consecutive weights per row (50%%, for SparseMask.export(model, '2:4') on CUDA)"})
    max_layer_sparsity: float = field(default=0.99, metadata={"help": "global and structured scopes: at most this fraction of one layer pruned, the rest taken elsewhere (1.0: no cap; structured: below 1 keeps a head and a neuron per layer)"})
    no_region_loss: bool = field(default=False, metadata={"help": "distil image embedding + patch tokens only"})
    output_dir: str = field(default="runs/prune", metadata={"help": "where rounds, the final mask and counts are written"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": OVERWRITE_HELP})
    no_resume: bool = field(default=False, metadata={"help": "do not resume the rounds output_dir holds (such a directory then needs --overwrite_output_dir, which removes them)"})
    ignore_checkpoint_mismatch: bool = field(default=False, metadata={"help": "resume even if the saved rounds were made with other settings (the differences are printed)"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the final mask adapter"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push_to_hub"})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ArgumentError("--push_to_hub needs --hub_model_id")
        if self.push_to_hub and is_offline():
            raise ArgumentError(f"--push_to_hub {self.hub_model_id}: HF_HUB_OFFLINE is set, so nothing can be pushed; "
                                "unset it, or prune without --push_to_hub and push the mask adapter later")
        check_at_least_one(self, "batch_size", "num_rounds", "embedded_size")
        check_non_negative(self, "steps_per_round")
        check_fraction("rate", self.rate)
        check_fraction("target_sparsity", self.target_sparsity)
        check_positive("learning_rate", self.learning_rate)
        check_percentage("validation_split_percentage", self.validation_split_percentage)
        check_max_layer_sparsity(self.max_layer_sparsity, name="--max_layer_sparsity", error=ArgumentError)
        try:  # the IMP schedule the flags make together (e.g. scope 2:4 is one round at 0.5)
            self.imp_config()
        except ValueError as err:
            raise ArgumentError(f"--scope {self.scope}: {err}") from None
        check_output_dir(self)
        check_local_paths(self, "model_name_or_path")

    def imp_config(self) -> IMPConfig:
        """The IMP configuration of these arguments."""
        return IMPConfig(rate=self.rate, num_rounds=self.num_rounds, target_sparsity=self.target_sparsity,
                         steps_per_round=self.steps_per_round, learning_rate=self.learning_rate, scope=self.scope,
                         seed=self.seed, max_layer_sparsity=self.max_layer_sparsity,
                         region_weight=0.0 if self.no_region_loss else 1.0, output_dir=str(self.output_dir),
                         resume=not self.no_resume, ignore_mismatch=self.ignore_checkpoint_mismatch)


PRUNE_LAYOUT = OutputLayout("prune", ("round_*", "student.safetensors", "initial.safetensors", "state.json", "mask",
                                      "counts.json", "sparsity.png"))
"""What a prune run writes into its output directory: the rounds, the student's weights with the run's
state, the final mask, its counts and plot."""


def holds_rounds(args: PruneArguments) -> bool:
    """The output directory holds the rounds (and state) of a run that can be resumed."""
    out = Path(args.output_dir)
    return (out / "student.safetensors").is_file() or (out / "state.json").is_file()


ARGUMENTS = PruneArguments


def run(args: PruneArguments) -> dict:
    """Prune, write the rounds, the final mask and the counts to ``args.output_dir`` (holding its lock:
    one run per directory); returns the summary."""
    accelerator = make_accelerator()
    with output_dir_lock(args.output_dir, accelerator, "prune"):
        rounds = holds_rounds(args)  # resumed by default (IMP refuses a state made with other settings)
        claim(args.output_dir, PRUNE_LAYOUT, overwrite=args.overwrite_output_dir,
              resuming=rounds and not args.no_resume and not args.overwrite_output_dir,
              resume_hint="the same arguments without --no_resume" if rounds else None, state=accelerator)
        return _prune(accelerator, args)


def _prune(accelerator, args: PruneArguments) -> dict:
    set_seed(args.seed)
    out = Path(args.output_dir)
    clip_path = default_clip(args.model_name_or_path, accelerator)
    with quiet_loading():
        model = load_or_explain(clip_path, lambda: CLIPVisionModel.from_pretrained(clip_path, use_safetensors=True), "CLIP model")
    split = distillation_split(args.dataset, args.split, model.config.image_size, seed=args.seed,
                               embedded_size=args.embedded_size, image_column=args.image_column,
                               label_column=args.label_column, with_labels=not args.no_region_loss,
                               validation_split_percentage=args.validation_split_percentage)
    loader = make_loader(split, args.batch_size, shuffle=True, seed=args.seed)
    config = IMPConfig(rate=args.rate, num_rounds=args.num_rounds, target_sparsity=args.target_sparsity,
                       steps_per_round=args.steps_per_round, learning_rate=args.learning_rate, scope=args.scope, seed=args.seed,
                       max_layer_sparsity=args.max_layer_sparsity,
                       region_weight=0.0 if args.no_region_loss else 1.0, output_dir=str(out),
                       resume=not args.no_resume, ignore_mismatch=args.ignore_checkpoint_mismatch)
    # the job's settings that change the result, beside the IMP config's own: a resume must share them
    run_settings = {"model_name_or_path": args.model_name_or_path, "dataset": args.dataset, "split": args.split,
                    "image_column": args.image_column, "label_column": args.label_column,
                    "batch_size": args.batch_size, "seed": args.seed, "num_processes": accelerator.num_processes,
                    "validation_split_percentage": args.validation_split_percentage,
                    "embedded_size": args.embedded_size if args.dataset == "embedded" else None}
    mask = iterative_magnitude_prune(model, loader, config, accelerator=accelerator, fingerprint=run_settings)
    mask.base_model_name_or_path = args.model_name_or_path or mask.base_model_name_or_path
    counts = count_params_and_flops(model, mask)
    # what transfers is the mask on the ORIGINAL CLIP weights (not the distilled student): its own zero-shot
    zero_shot = pruned_zero_shot(clip_path, mask, args, accelerator)  # every process (a collective)
    mask.extra = {**mask.extra, "zero_shot": zero_shot}
    result = {"sparsity": mask.sparsity, "rounds": config.num_rounds, "mask": str(out / "mask"),
              "params": counts["params"], "effective_params": counts["effective_params"],
              "macs": counts["macs"], "effective_macs": counts["effective_macs"],
              "num_processes": accelerator.num_processes, "zero_shot": zero_shot}

    def write():  # the main process; the others share its outcome (no one waits on a failed main process)
        mask.save_pretrained(out / "mask")
        atomic_write_text(out / "counts.json", json.dumps(result, indent=2) + "\n")
        try:
            mask.plot(out / "sparsity.png")
        except ImportError as err:
            print(f"plot skipped: {err}")
        print(mask.summary().splitlines()[0])
        print(f"params {counts['params']:,d} -> {counts['effective_params']:,d} effective; "
              f"MACs {counts['macs']:,d} -> {counts['effective_macs']:,d}")
        print(zero_shot_line(zero_shot))
        print(f"mask adapter: {out / 'mask'}")
        if args.push_to_hub:
            print(f"pushed: {mask.push_to_hub(args.hub_model_id)}")

    on_main_process(accelerator, write)
    return result


ZERO_SHOT_KEYS = ("mean_iou", "mean_iou_seen", "mean_iou_unseen")  # fractions of 1, as metrics.json


def pruned_zero_shot(clip_path: str, mask, args: PruneArguments, accelerator=None, with_dense: bool = True) -> dict:
    """The training-free dense zero-shot (:func:`~opentrans_hf.training.pretraining.zero_shot_evaluation`: mIoU over
    all / seen / held-out classes, fractions of 1) of the dense CLIP at ``clip_path`` and of the same
    CLIP's original weights with ``mask`` applied to its vision tower -- what a framework with a frozen
    CLIP (FC-CLIP) recognises out of vocabulary, since the mask, not the distilled student, transfers.

    Returns ``{"dense": {...}, "pruned": {...}, "examples", "split", "model"}`` (no ``"dense"`` with
    ``with_dense=False``, for a caller that has it already); or ``{"skipped": reason}``
    when it cannot be measured: the evaluation split is the embedded dataset's, so only a job pruning on
    ``--dataset embedded`` gets it, and the checkpoint needs CLIP's text tower and tokenizer. With
    ``accelerator`` a collective: every process must call it (each scores its share of the examples, all
    return the same numbers); the skip decisions depend on files alone, so every process takes the same.
    """
    if args.dataset != "embedded":
        return {"skipped": f"--dataset {args.dataset!r} is not the embedded dataset: the pruned CLIP's own dense "
                           "zero-shot is measured on the embedded validation split (its 16 class names, 4 of them "
                           "held out) only; score the mask on your data with a framework (opentrans-hf train "
                           "--mask, evaluate)"}
    try:
        with quiet_loading():
            kind = AutoConfig.from_pretrained(clip_path).model_type
            tokenizer = AutoTokenizer.from_pretrained(clip_path) if kind == "clip" else None
    except (OSError, ValueError) as err:
        return {"skipped": f"{clip_path}: no CLIP config or tokenizer to score class prompts with ({err})"}
    if kind != "clip":
        return {"skipped": f"{clip_path} is a {kind!r} checkpoint, not a full CLIP (no text tower to score class "
                           "prompts with)"}
    with quiet_loading():
        clip = load_or_explain(clip_path, lambda: CLIPModel.from_pretrained(clip_path, use_safetensors=True), "CLIP model").eval()
    if accelerator is not None:
        clip.to(accelerator.device)
    common = dict(embedded_size=args.embedded_size, seed=args.seed, accelerator=accelerator)
    scored = {"dense": zero_shot_evaluation(clip, tokenizer, **common)} if with_dense else {}
    mask.apply(clip)  # SparseMask resolves the vision tower's names inside a CLIPModel (vision_model.*)
    scored["pruned"] = zero_shot_evaluation(clip, tokenizer, **common)
    clean = lambda v: None if v is None or math.isnan(v) else float(v)  # noqa: E731 - JSON has no NaN
    result = {name: {k: clean(zs[f"dense_{k}"]) for k in ZERO_SHOT_KEYS} for name, zs in scored.items()}
    result.update(examples=scored["pruned"]["examples"],
                  split=f"embedded validation split (embedded_size {args.embedded_size}, seed {args.seed})",
                  model="pruned: the original CLIP weights with the final mask (not the distilled student)")
    if args.split == "validation":
        result["note"] = "the mask was distilled on the evaluated split's images (--split validation)"
    return result


def zero_shot_line(zero_shot: dict) -> str:
    """One line with the dense and the pruned CLIP's zero-shot (percent), or why it was skipped."""
    if "skipped" in zero_shot:
        return f"pruned CLIP zero-shot skipped: {zero_shot['skipped']}"
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    row = lambda r: " / ".join(pct(r[k]) for k in ZERO_SHOT_KEYS)  # noqa: E731
    return (f"dense zero-shot mIoU all / seen / unseen (%), {zero_shot['examples']} embedded validation images: "
            f"dense CLIP {row(zero_shot['dense'])}; pruned CLIP (original weights x mask) {row(zero_shot['pruned'])}")
