"""``scripts/prune.py`` / ``opentrans-hf prune``: IMP on a segmentation (or image) dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model_name_or_path", default=None, help="CLIP checkpoint (Hub id or dir); default: random small CLIP")
    p.add_argument("--dataset", default="embedded", help="Hub dataset, save_to_disk dir, image/label folder, or 'embedded'")
    p.add_argument("--split", default="train")
    p.add_argument("--image_column", default=None)
    p.add_argument("--label_column", default=None)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--num_rounds", type=int, default=None)
    p.add_argument("--target_sparsity", type=float, default=None)
    p.add_argument("--steps_per_round", type=int, default=5000)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--scope", default="global", choices=["global", "layerwise", "alpha"])
    p.add_argument("--no_region_loss", action="store_true", help="distil image embedding + patch tokens only")
    p.add_argument("--output_dir", default="runs/prune")
    p.add_argument("--no_resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedded_size", type=int, default=192)
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    return p


def run(args) -> dict:
    from ..distributed import make_accelerator
    from accelerate.utils import set_seed
    from transformers import CLIPVisionModel

    from ..data.loading import find_columns, load_segmentation_dataset
    from ..data.synthetic import embedded_dataset
    from ..data.transforms import SegmentationTransform
    from ..hub import load_or_explain, quiet_loading
    from ..random_clip import clip_or_random
    from ..training.data import SegmentationSplit, make_loader
    from .counting import count_params_and_flops
    from .imp import IMPConfig, iterative_magnitude_prune

    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    accelerator = make_accelerator()
    set_seed(args.seed)
    out = Path(args.output_dir)
    clip_path = clip_or_random(args.model_name_or_path, out, args.seed, accelerator)
    with quiet_loading():
        model = load_or_explain(clip_path, lambda: CLIPVisionModel.from_pretrained(clip_path), "CLIP model")
    size = model.config.image_size
    if args.dataset == "embedded":
        ds = embedded_dataset(args.split, args.embedded_size, size, args.seed)
    else:
        ds = load_segmentation_dataset(args.dataset, args.split)
    img_col, lab_col = find_columns(ds, args.image_column, args.label_column)
    if args.no_region_loss:
        lab_col = None
    split = SegmentationSplit(ds, img_col, lab_col, class_names=[], transform=SegmentationTransform(size, train=True),
                              seed=args.seed)
    loader = make_loader(split, args.batch_size, shuffle=True, seed=args.seed)
    config = IMPConfig(rate=args.rate, num_rounds=args.num_rounds, target_sparsity=args.target_sparsity,
                       steps_per_round=args.steps_per_round, learning_rate=args.learning_rate, scope=args.scope,
                       region_weight=0.0 if args.no_region_loss else 1.0, output_dir=str(out),
                       resume=not args.no_resume)
    mask = iterative_magnitude_prune(model, loader, config, accelerator=accelerator)
    mask.base_model_name_or_path = args.model_name_or_path or mask.base_model_name_or_path
    counts = count_params_and_flops(model, mask)
    result = {"sparsity": mask.sparsity, "rounds": config.num_rounds, "mask": str(out / "mask"),
              "params": counts["params"], "effective_params": counts["effective_params"],
              "macs": counts["macs"], "effective_macs": counts["effective_macs"],
              "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        from ..io import atomic_write_text

        mask.save_pretrained(out / "mask")
        atomic_write_text(out / "counts.json", json.dumps(result, indent=2) + "\n")
        try:
            mask.plot(out / "sparsity.png")
        except ImportError as err:
            print(f"plot skipped: {err}")
        print(mask.summary().splitlines()[0])
        print(f"params {counts['params']:,d} -> {counts['effective_params']:,d} effective; "
              f"MACs {counts['macs']:,d} -> {counts['effective_macs']:,d}")
        print(f"mask adapter: {out / 'mask'}")
        if args.push_to_hub:
            print(f"pushed: {mask.push_to_hub(args.hub_model_id)}")
    accelerator.wait_for_everyone()
    return result


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))
