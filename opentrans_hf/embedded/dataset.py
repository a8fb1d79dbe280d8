"""The embedded dataset: procedurally generated open-vocabulary segmentation scenes with captions.

Each image is a background "stuff" class with 0-3 shapes (discs, rectangles, triangles) of other
classes; every class has its own colour and texture, so a small model learns it in minutes on a CPU.
Deterministic: example ``i`` of a given seed is always the same. Four of the 16 classes are held out of
segmentation training (their pixels are ignored there) for zero-shot evaluation.

Every example also has a caption naming exactly the classes in it ("a photo of grass, sand and snow.",
several phrasings), the image-text pairs a CLIP is pretrained on (``opentrans-hf pretrain-clip``). The
held-out classes appear in captions like every other class -- as in CLIP's web data -- but never in a
segmentation label the frameworks train on. ``DATA_VERSION`` changes whenever the rendering changes, so
models pretrained on an earlier version are not mistaken for current ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DATA_VERSION = 2
CLASS_NAMES = ["sky", "grass", "water", "sand", "road", "brick wall", "snow", "forest",
               "rock", "flower", "wood", "carpet", "fence", "tile", "metal", "leaves"]
HELD_OUT_CLASSES = ["snow", "forest", "flower", "tile"]
_COLORS = {
    "sky": (135, 190, 235), "grass": (70, 160, 60), "water": (30, 80, 170), "sand": (220, 200, 140),
    "road": (110, 110, 115), "brick wall": (160, 70, 50), "snow": (245, 248, 252), "forest": (25, 75, 35),
    "rock": (95, 80, 70), "flower": (220, 90, 170), "wood": (170, 110, 50), "carpet": (110, 50, 140),
    "fence": (200, 190, 60), "tile": (60, 170, 170), "metal": (180, 185, 195), "leaves": (230, 140, 30),
}
CAPTION_TEMPLATES = ("a photo of {}.", "a picture of {}.", "{}.", "there is {} in the scene.",
                     "an image with {}.", "a view of {}.")
"""Phrasings of a caption; ``{}`` is the list of the classes present ("grass, sand and snow")."""


def _texture(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yi, xi = yy.astype(int), xx.astype(int)
    base = np.array(_COLORS[name], dtype=np.float32)
    noise = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    if name == "sky":
        pat = (yy / max(h - 1, 1) * 30 - 15)[..., None]
    elif name == "grass":
        pat = (np.sin(xx * 1.7 + rng.uniform(0, 6)) * 18)[..., None]
    elif name == "water":
        pat = (np.sin(yy * 0.9 + np.sin(xx * 0.3) * 2) * 20)[..., None]
    elif name == "sand":
        pat = rng.normal(0, 14, (h, w, 1)).astype(np.float32)
    elif name == "road":
        pat = (((yi // 3) % 6 == 0) & ((xi // 4) % 2 == 0)).astype(np.float32)[..., None] * 90
    elif name == "brick wall":
        mortar = (yi % 4 == 0) | (((xi + 4 * ((yi // 4) % 2)) % 8) == 0)
        pat = mortar.astype(np.float32)[..., None] * 70
    elif name == "snow":
        pat = -(rng.random((h, w, 1)) < 0.08).astype(np.float32) * 60
    elif name == "forest":
        pat = (np.sin(xx * 0.8) * np.cos(yy * 0.8) * 25)[..., None]
    elif name == "rock":  # large dark blotches and cracks
        pat = (np.sin(xx * 0.35 + 1.3 * np.sin(yy * 0.4)) * np.sin(yy * 0.3 + rng.uniform(0, 6)) * 35)[..., None]
    elif name == "flower":  # bright dots on the petal colour
        dots = ((yi % 5 - 2) ** 2 + (xi % 5 - 2) ** 2) <= 1
        pat = dots.astype(np.float32)[..., None] * np.array([35, 120, 60], dtype=np.float32)
    elif name == "wood":  # horizontal grain
        pat = (np.sin(yy * 1.3 + np.sin(xx * 0.15) * 3) * 28)[..., None]
    elif name == "carpet":  # checkerboard
        pat = (((yi // 3) + (xi // 3)) % 2).astype(np.float32)[..., None] * 55 - 27
    elif name == "fence":  # vertical bars with dark gaps
        pat = -((xi % 6) >= 4).astype(np.float32)[..., None] * 110
    elif name == "tile":  # square grid of light grout
        pat = ((yi % 8 == 0) | (xi % 8 == 0)).astype(np.float32)[..., None] * 80
    elif name == "metal":  # diagonal brushed stripes
        pat = (np.sin((xx + yy) * 0.9) * 22)[..., None]
    else:  # leaves: scattered dark spots
        pat = -(rng.random((h, w, 1)) < 0.25).astype(np.float32) * np.array([60, 60, 20], dtype=np.float32)
    return base + pat + noise


def caption(class_ids, rng: np.random.Generator, class_names: list[str] = CLASS_NAMES) -> str:
    """A caption naming exactly the classes ``class_ids`` (in a random order), in a random phrasing."""
    names = [class_names[int(c)] for c in rng.permutation(np.asarray(sorted(set(int(c) for c in class_ids))))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)


def render_example(index: int, image_size: int = 64, seed: int = 0,
                   class_names: list[str] = CLASS_NAMES) -> tuple[np.ndarray, np.ndarray]:
    """(image ``(S, S, 3)`` uint8, label map ``(S, S)`` uint8) of example ``index``."""
    rng = np.random.default_rng([seed, index])
    k = len(class_names)
    s = image_size
    label = np.full((s, s), rng.integers(k), dtype=np.uint8)
    yy, xx = np.mgrid[0:s, 0:s]
    for c in rng.choice(k, size=int(rng.choice(4, p=[0.15, 0.25, 0.3, 0.3])), replace=False):
        kind = rng.integers(3)
        cy, cx = rng.uniform(0.15, 0.85, size=2) * s
        r = rng.uniform(0.12, 0.3) * s
        if kind == 0:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        elif kind == 1:
            region = (np.abs(yy - cy) <= r * rng.uniform(0.5, 1.0)) & (np.abs(xx - cx) <= r)
        else:
            region = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        label[region] = c
    image = np.zeros((s, s, 3), dtype=np.float32)
    for c in np.unique(label):
        tex = _texture(class_names[c], s, s, rng)
        image[label == c] = tex[label == c]
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_synthetic_segmentation_dataset(num_examples: int, image_size: int = 64, seed: int = 0):
    """A ``datasets.Dataset`` with ``image`` (Image), ``label`` (Image, class index per pixel) and
    ``classes`` (Sequence of ClassLabel: the classes present; its names are the dataset's classes) and
    ``caption`` (a sentence naming the classes present, for image-text pretraining)."""
    import datasets
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    images, labels, present, captions = [], [], [], []
    for i in range(num_examples):
        img, lab = render_example(i, image_size, seed)
        images.append(Image.fromarray(img))
        labels.append(Image.fromarray(lab))
        present.append(sorted(int(c) for c in np.unique(lab)))
        captions.append(caption(present[-1], np.random.default_rng([seed, i, 1])))
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.Image(),
        "classes": datasets.Sequence(datasets.ClassLabel(names=CLASS_NAMES)),
        "caption": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, "classes": present, "caption": captions},
                                    features=features)
    ds.info.description = (f"opentrans-hf embedded synthetic segmentation dataset v{DATA_VERSION} (seed {seed}, {image_size}px); "
                           f"held-out classes for zero-shot evaluation: {HELD_OUT_CLASSES}")
    return ds


def embedded_dataset(split: str = "train", num_train: int = 192, image_size: int = 64, seed: int = 0):
    """The embedded default: ``train`` (``num_train`` examples) or ``validation`` (a quarter as many,
    disjoint seeds)."""
    if split == "train":
        return make_synthetic_segmentation_dataset(num_train, image_size, seed)
    if split in ("validation", "test"):
        return make_synthetic_segmentation_dataset(max(8, num_train // 4), image_size, seed + 10_000 + (split == "test"))
    raise ValueError(f"the embedded dataset has splits 'train', 'validation' and 'test', not {split!r}")
