"""pipeline("open-vocabulary-segmentation", model=...): the shape transformers' image-segmentation pipeline
returns for semantic segmentation, equal to model.predict, with synonyms, batching, URLs and sliding windows."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, pipeline

from opentrans_hf import CLIPDeepLabV3ForOVS, OpenVocabularySegmentationPipeline
from opentrans_hf.pipelines import segmentation

CLASSES = ["sky", "road|street", "car"]
NAMES = ["sky", ("road", "street"), "car"]


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe") / "model"
    torch.manual_seed(0)
    CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16, learn_void_embedding=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    return pipeline("open-vocabulary-segmentation", model=str(model_dir))


def _image(h=37, w=53, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_masks_per_class_present_at_the_image_size(pipe):
    assert isinstance(pipe, OpenVocabularySegmentationPipeline)
    out = pipe(_image(), candidate_labels=CLASSES)
    assert out and {o["label"] for o in out} <= {"sky", "road", "car"}
    total = np.zeros((37, 53), dtype=int)
    for o in out:
        assert set(o) == {"label", "score", "mask"} and o["score"] is None
        assert o["mask"].mode == "L" and o["mask"].size == (53, 37)
        m = np.asarray(o["mask"])
        assert set(np.unique(m)) <= {0, 255}
        total += m == 255
    assert (total == 1).all()  # every pixel in exactly one mask (allow_void=False)


def test_label_map_equals_model_predict_for_every_input_kind(pipe, model_dir, tmp_path):
    model = AutoModel.from_pretrained(model_dir)
    rgb = _image()
    rgba = rgb.convert("RGBA")
    grey16 = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    rgb.save(tmp_path / "photo.png")
    inputs = [rgb, rgba, grey16, str(tmp_path / "photo.png"), np.asarray(rgb)]
    maps = pipe(inputs, candidate_labels=CLASSES, return_label_map=True)
    expected = model.predict([rgb, rgba, grey16, rgb, rgb], NAMES, allow_void=False)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    assert maps[0].shape == (37, 53)
    batched = pipe(inputs, candidate_labels=CLASSES, return_label_map=True, batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(batched, maps))
    void = pipe(rgb, candidate_labels=CLASSES, return_label_map=True, allow_void=True)
    with_void = model.predict([rgb], NAMES, allow_void=True)[0]
    assert torch.equal(void, torch.where(with_void == model.config.ignore_index, segmentation.VOID, with_void))


def test_urls_load_through_transformers(pipe, monkeypatch):
    seen = []

    def fake(url, timeout=None):
        seen.append((url, timeout))
        return _image()

    monkeypatch.setattr(segmentation, "load_url_image", fake)
    out = pipe("https://example.com/a.jpg", candidate_labels=CLASSES, timeout=3, return_label_map=True)
    assert seen == [("https://example.com/a.jpg", 3)] and out.shape == (37, 53)


def test_sliding_window_averages_windows_and_upsamples(pipe, model_dir):
    model = AutoModel.from_pretrained(model_dir).eval()
    img = _image(40, 90)
    got = pipe(img, candidate_labels=CLASSES, sliding_window=True, shortest_edge=45, return_label_map=True)
    x = model.get_image_processor()(img, size={"shortest_edge": 45}, return_tensors="pt")["pixel_values"]
    assert x.shape[-2:] == (45, 101)
    scores = model.sliding_scores(x, class_names=NAMES)  # windows of 30 every 20 pixels
    ref = F.interpolate(scores[None, :3], size=(40, 90), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(got, ref)
    # a list of images of other shapes, with a batch size: one image at a time, each at its own size
    many = pipe([img, _image(50, 40)], candidate_labels=CLASSES, sliding_window=True, shortest_edge=45,
                return_label_map=True, batch_size=4)
    assert torch.equal(many[0], got) and many[1].shape == (50, 40)


def test_text_weights_changed_in_place_give_new_class_embeddings(model_dir):
    pipe = pipeline("open-vocabulary-segmentation", model=str(model_dir))
    before = pipe(_image(), candidate_labels=CLASSES, return_label_map=True)
    with torch.no_grad():
        pipe.model.clip.text_projection.weight.mul_(-1)  # every class embedding flips: the scores change
    after = pipe(_image(), candidate_labels=CLASSES, return_label_map=True)
    assert not torch.equal(before, after)
    assert torch.equal(after, pipe.model.predict([_image()], NAMES, allow_void=False)[0])


def test_bad_calls_say_what_is_missing(pipe):
    with pytest.raises(ValueError, match="candidate_labels"):
        pipe(_image())
    with pytest.raises(ValueError, match="duplicates"):
        pipe(_image(), candidate_labels=["sky", "sky"])
    with pytest.raises(ValueError, match="empty synonym"):
        pipe(_image(), candidate_labels=["sky", "road|"])


def test_device_and_dtype(model_dir):
    pipe = pipeline("open-vocabulary-segmentation", model=str(model_dir), device="cpu", dtype=torch.bfloat16)
    assert pipe.model.dtype == torch.bfloat16
    out = pipe(_image(), candidate_labels=CLASSES, return_label_map=True)
    assert out.shape == (37, 53) and out.dtype == torch.long


def test_a_directory_saved_before_processors_were_saved_still_works(model_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    (old / "preprocessor_config.json").unlink()
    (old / "processor_config.json").unlink()
    pipe = pipeline("open-vocabulary-segmentation", model=str(old))
    got = pipe(_image(), candidate_labels=CLASSES, return_label_map=True)
    expected = AutoModel.from_pretrained(model_dir).predict([_image()], NAMES, allow_void=False)[0]
    assert torch.equal(got, expected)
