"""The embedded synthetic dataset: deterministic, labelled, with held-out classes."""

import numpy as np

from opentrans_hf.data import CLASS_NAMES, HELD_OUT_CLASSES, embedded_dataset
from opentrans_hf.data.assembly import load_source
from opentrans_hf.embedded.dataset import render_example


def test_deterministic_and_consistent():
    a_img, a_lab = render_example(5, 48, seed=3)
    b_img, b_lab = render_example(5, 48, seed=3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, _ = render_example(6, 48, seed=3)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (48, 48, 3) and a_lab.shape == (48, 48) and a_lab.max() < len(CLASS_NAMES)


def test_dataset_features_and_splits():
    train = embedded_dataset("train", num_train=16, image_size=32)
    val = embedded_dataset("validation", num_train=16, image_size=32)
    assert len(train) == 16 and len(val) == 8
    assert load_source("embedded", "train", 32, embedded_size=16)["names"] == CLASS_NAMES
    assert set(HELD_OUT_CLASSES) < set(CLASS_NAMES) and train.features["classes"].feature.names == CLASS_NAMES
    ex = train[0]
    lab = np.asarray(ex["label"])
    assert sorted(np.unique(lab).tolist()) == sorted(ex["classes"])
    assert not np.array_equal(np.asarray(train[0]["image"]), np.asarray(val[0]["image"]))
    # every class appears somewhere, so both seen and held-out classes can be evaluated
    seen = set()
    for e in embedded_dataset("train", num_train=64, image_size=32):
        seen.update(e["classes"])
    assert seen == set(range(len(CLASS_NAMES)))
