"""Which part of a trained FC-CLIP limits its mIoU: re-scores a saved model on the embedded validation split
with the geometric ensemble's weights changed (in-vocabulary head alone, out-of-vocabulary branch alone, ...),
with soft instead of binary mask pooling, and without the void factor.

    python examples/probe_fcclip_branches.py runs/train/model
"""

from __future__ import annotations

import argparse

import torch

import opentrans_hf.models.fcclip.modeling_fcclip as fcclip
from opentrans_hf.data.assembly import load_split
from opentrans_hf.models import CLIPFCCLIPForOVS
from opentrans_hf.training.evaluation import evaluate_splits, percent

SETTINGS = [(0.4, 0.8, "binary", "FC-CLIP's ensemble"), (0.0, 0.0, "binary", "in-vocabulary head alone"),
            (1.0, 1.0, "binary", "out-of-vocabulary branch alone"), (0.4, 1.0, "binary", "beta 1.0"),
            (0.6, 0.9, "binary", "alpha 0.6, beta 0.9"), (0.4, 0.8, "soft", "soft mask pooling")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved CLIPFCCLIPForOVS directory (train --framework fcclip writes <out>/model)")
    parser.add_argument("--embedded_size", type=int, default=192)
    args = parser.parse_args()
    model = CLIPFCCLIPForOVS.from_pretrained(args.model).eval()
    split = {"embedded": load_split("embedded", "validation", model.config.image_size, embedded_size=args.embedded_size)}
    seen = model.config.seen_class_names
    if not seen:
        parser.error(f"{args.model} records no seen_class_names (the train job sets them): seen and unseen classes "
                     "cannot be told apart")

    def score(label):
        r = evaluate_splits(model, split, seen_classes=seen)["embedded"]
        print(f"{label:32s} seen {percent(r['mean_iou_seen'])}  unseen {percent(r['mean_iou_unseen'])}")

    for alpha, beta, pooling, label in SETTINGS:
        model.config.ensemble_alpha, model.config.ensemble_beta, model.config.mask_pooling = alpha, beta, pooling
        score(label)
    model.config.ensemble_alpha, model.config.ensemble_beta, model.config.mask_pooling = 0.4, 0.8, "binary"
    original = fcclip.geometric_ensemble
    fcclip.geometric_ensemble = lambda p_in, p_out, s, a, b, void, valid=None: original(
        p_in, p_out, s, a, b, torch.zeros_like(void), valid)
    try:
        score("without the void factor")
    finally:
        fcclip.geometric_ensemble = original


if __name__ == "__main__":
    main()
