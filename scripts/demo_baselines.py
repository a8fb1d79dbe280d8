"""The baselines beside `make demo`'s result in the README: the same DeepLabV3-style model untrained,
and uniformly random labels, on the embedded validation split. Run after `make demo` (it reuses the
demo's random CLIP and its seen classes):

    .venv/bin/python scripts/demo_baselines.py [--run runs/demo]
"""

import argparse
from pathlib import Path

import torch

from opentrans_hf.frameworks import CLIPDeepLabV3ForOVS
from opentrans_hf.io import read_json
from opentrans_hf.training.evaluation import evaluate_splits, results_table
from opentrans_hf.training.metrics import SegmentationMetric
from opentrans_hf.data.assembly import load_split


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="output_dir of `opentrans-hf demo`")
    args = parser.parse_args()
    run = Path(args.run)
    summary = read_json(run / "summary.json", "demo summary")
    seen = summary["training"]["train_classes"]
    torch.manual_seed(0)
    model = CLIPDeepLabV3ForOVS.from_clip(summary["clip"], seen_class_names=seen)
    split = load_split("embedded", "validation", model.config.image_size)
    untrained = evaluate_splits(model, {"untrained": split}, seen_classes=seen)
    print(results_table(untrained))
    metric = SegmentationMetric(len(split.class_names))
    g = torch.Generator().manual_seed(0)
    for i in range(len(split)):
        _, y = split[i]
        metric.update(torch.randint(0, len(split.class_names), y.shape, generator=g)[None], y[None])
    print(f"uniform random labels: mIoU {100 * metric.compute()['mean_iou']:.2f}")


if __name__ == "__main__":
    main()
