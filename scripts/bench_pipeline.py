"""Benchmark: what the ``open-vocabulary-segmentation`` pipeline costs over the loop a user writes by hand.

A DeepLabV3-style model around a random-initialised CLIP ViT-B/16 (``make_random_clip(size="vit-b16")``,
224 px input), 8 class names (two with synonyms), ``--images`` photos of 480 x 640 (random pixels; their
content does not change the cost), CPU, default threads. Variants, each segmenting every image into a
label map at its own size:

* ``hand_loop`` / ``hand_loop_b1``: what one writes without the library's helpers: resize each image to
  224 x 224 and normalise (the processor's own functions), one forward of a batch of 8 (of 1) with
  ``class_names=``, argmax, nearest-neighbour upsampling of the label map;
* ``predict``: ``model.predict(images, classes)`` (batch 8): the processor, the forward,
  ``post_process_semantic_segmentation`` (class scores upsampled bilinearly to the image, then argmax);
* ``pipeline_b1`` / ``pipeline_b8``: ``pipe(images, candidate_labels=..., return_label_map=True,
  batch_size=1 | 8)``;
* ``pipeline_masks``: ``pipe(images, candidate_labels=..., batch_size=8)``: PIL masks per class present.

Timing: one warm-up pass of every variant, then ``--rounds`` interleaved rounds (the order rotating), per
variant the median; ratios are variant / ``hand_loop`` (above 1: slower), and ``pipeline_b1`` /
``hand_loop_b1`` (the pipeline's own cost at batch 1). The last line printed is a JSON
object with the ratios and the images per second of each variant.

Usage: ``python scripts/bench_pipeline.py [--rounds 3] [--images 16] [--quick]`` (``--quick``: the tiny CLIP
and 4 small images, for a test; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import pipeline

import opentrans_hf  # noqa: F401 - registers the pipeline task
from opentrans_hf.data.transforms import normalize, resize_image, to_image_tensor
from opentrans_hf.embedded.random_clip import make_random_clip
from opentrans_hf.models import CLIPDeepLabV3ForOVS

CLASSES = ["wall", "building|edifice", "sky", "floor", "tree", "road|street", "person", "car"]
NAMES = [tuple(c.split("|")) if "|" in c else c for c in CLASSES]


def hand_loop(model, images, batch_size=8):
    size = model.config.image_size
    ip = model.get_image_processor()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            chunk = images[s : s + batch_size]
            x = torch.stack([normalize(resize_image(to_image_tensor(im), (size, size)), ip.image_mean, ip.image_std)
                             for im in chunk])
            pred = model(pixel_values=x, class_names=NAMES).logits.argmax(1)
            out += [F.interpolate(p[None, None].float(), size=(im.height, im.width), mode="nearest")[0, 0].long()
                    for p, im in zip(pred, chunk)]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    size, n, hw = ("tiny", 4, (48, 64)) if args.quick else ("vit-b16", args.images, (480, 640))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_random_clip(Path(tmp) / "clip", size)
        torch.manual_seed(0)
        model_dir = Path(tmp) / "model"
        CLIPDeepLabV3ForOVS.from_clip(clip).save_pretrained(model_dir)
        pipe = pipeline("open-vocabulary-segmentation", model=str(model_dir), device="cpu")
        model = pipe.model.eval()
        variants = {
            "hand_loop": lambda: hand_loop(model, images),
            "hand_loop_b1": lambda: hand_loop(model, images, batch_size=1),
            "predict": lambda: model.predict(images, NAMES, allow_void=False),
            "pipeline_b1": lambda: pipe(images, candidate_labels=CLASSES, return_label_map=True, batch_size=1),
            "pipeline_b8": lambda: pipe(images, candidate_labels=CLASSES, return_label_map=True, batch_size=8),
            "pipeline_masks": lambda: pipe(images, candidate_labels=CLASSES, batch_size=8),
        }
        same = all(torch.equal(a, b) for a, b in zip(variants["predict"](), variants["pipeline_b8"]()))
        times = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                variants[k]()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} images of {hw[0]}x{hw[1]}, CLIP {size}, {len(CLASSES)} classes, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'variant':<16} {'seconds':>8} {'images/s':>9} {'vs hand loop':>13}")
    for k, v in med.items():
        print(f"{k:<16} {v:8.2f} {n / v:9.2f} {v / med['hand_loop']:12.2f}x")
    result = {"pipeline_label_map_equals_predict": same,
              "pipeline_b1_vs_hand_loop_b1": round(med["pipeline_b1"] / med["hand_loop_b1"], 3),
              **{f"{k}_vs_hand_loop": round(v / med["hand_loop"], 3) for k, v in med.items() if k != "hand_loop"},
              **{f"{k}_images_per_second": round(n / v, 3) for k, v in med.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
