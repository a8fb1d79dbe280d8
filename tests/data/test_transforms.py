"""Segmentation transforms (torch only): shapes, label handling, determinism, clear errors."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.image_transforms import normalize
from transformers.image_utils import ChannelDimension

from opentrans_hf.data.transforms import CLIP_MEAN, CLIP_STD, SegmentationTransform, collate_segmentation


def pair(h=40, w=52):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[:, w // 2 :] = 2
    lab[0, 0] = 255
    return img, Image.fromarray(lab)


def test_eval_resize_normalises_and_keeps_label_values():
    img, lab = pair()
    t = SegmentationTransform(size=32, num_labels=3)
    x, y = t(img, lab)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 2, 255}
    # a constant image normalises to (v - mean) / std
    flat, _ = t(Image.new("RGB", (10, 10), (255, 0, 0)), None)
    assert flat[0, 0, 0].item() == pytest.approx((1 - CLIP_MEAN[0]) / CLIP_STD[0], rel=1e-5)
    assert flat[1, 0, 0].item() == pytest.approx((0 - CLIP_MEAN[1]) / CLIP_STD[1], rel=1e-5)


def test_train_crop_flip_is_seeded_and_label_aligned():
    img, lab = pair()
    t = SegmentationTransform(size=24, train=True, num_labels=3)
    a = t(img, lab, rng=random.Random(3))
    b = t(img, lab, rng=random.Random(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the label's left/right split survives crop + flip: columns are constant in the valid area
    y = a[1]
    for col in range(24):
        vals = set(y[:, col].tolist()) - {255}
        assert len(vals) <= 1
    # upscaled small images get padded with the ignore index
    small = SegmentationTransform(size=64, train=True, scale_range=(0.5, 0.5), num_labels=3)
    _, ys = small(img, lab, rng=random.Random(0))
    assert ys.shape == (64, 64) and (ys == 255).any()


def test_reduce_labels_and_bad_label_errors():
    img, lab = pair()
    x, y = SegmentationTransform(size=16, reduce_labels=True, num_labels=2)(img, lab)
    assert set(y.unique().tolist()) <= {1, 255}  # 0 -> ignore, 2 -> 1
    with pytest.raises(ValueError, match=r"example 7: label value 2 is outside the 2 classes \[0, 1\]"):
        SegmentationTransform(size=16, num_labels=2)(img, lab, index=7)
    with pytest.raises(ValueError, match="example 3: image is \\(40, 52\\) but its label map is \\(5, 5\\)"):
        SegmentationTransform(size=16)(img, np.zeros((5, 5)), index=3)


def test_collate():
    img, lab = pair()
    t = SegmentationTransform(size=16, num_labels=3)
    batch = collate_segmentation([t(img, lab), t(img, lab)])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].shape == (2, 16, 16)


def test_normalisation_is_transformers_normalize():
    """The evaluation transform of an image already at its size is ``transformers.image_transforms.normalize``
    of the image rescaled to [0, 1], bit for bit (the CLIP statistics of ``CLIPImageProcessor``)."""
    img, _ = pair(32, 32)
    x, _ = SegmentationTransform(size=32)(img, None)
    chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    expected = normalize(chw, CLIP_MEAN, CLIP_STD, data_format=ChannelDimension.FIRST,
                         input_data_format=ChannelDimension.FIRST)
    assert torch.equal(x, torch.from_numpy(expected))
    processor = CLIPImageProcessor()
    assert (tuple(processor.image_mean), tuple(processor.image_std)) == (CLIP_MEAN, CLIP_STD)
