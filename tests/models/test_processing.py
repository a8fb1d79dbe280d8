"""The transformers way: Auto classes on import, OVSImageProcessor / OVSProcessor saved with every model,
forward on tensors only, post_process_semantic_segmentation."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPImageProcessor

import opentrans_hf
from opentrans_hf import (
    CLIPDeepLabV3ForOVS,
    CLIPFCCLIPForOVS,
    CLIPMask2FormerForOVS,
    OVSImageProcessor,
    OVSProcessor,
)
from opentrans_hf.data.transforms import CLIP_MEAN, CLIP_STD, SegmentationTransform
from opentrans_hf.models import image_processing_ovs

CLASSES = ["sky", "road|street", "car"]
NAMES = ["sky", ("road", "street"), "car"]
SMALL_M2F = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64,
                 decoder_layers=2, train_num_points=128)
SMALL = {"deeplabv3": dict(aspp_channels=16), "mask2former": SMALL_M2F, "fcclip": SMALL_M2F}
CLASSES_OF = {"deeplabv3": CLIPDeepLabV3ForOVS, "mask2former": CLIPMask2FormerForOVS, "fcclip": CLIPFCCLIPForOVS}


@pytest.fixture(scope="module")
def saved(tiny_clip_dir, tmp_path_factory):
    """One saved model directory per framework (FC-CLIP with seen classes, so its ensemble needs them)."""
    out = {}
    for name, cls in CLASSES_OF.items():
        d = tmp_path_factory.mktemp(name) / "model"
        torch.manual_seed(0)
        cls.from_clip(tiny_clip_dir, seen_class_names=["sky", "street"], **SMALL[name]).save_pretrained(d)
        out[name] = d
    return out


def _image(h=37, w=53, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_every_save_has_a_processor_the_auto_classes_load(saved):
    for name, d in saved.items():
        files = {p.name for p in d.iterdir()}
        assert {"preprocessor_config.json", "processor_config.json", "tokenizer.json", "config.json"} <= files, name
        assert isinstance(AutoModel.from_pretrained(d), CLASSES_OF[name])
        ip = AutoImageProcessor.from_pretrained(d)
        assert isinstance(ip, OVSImageProcessor) and ip.size == {"height": 30, "width": 30}
        proc = AutoProcessor.from_pretrained(d)
        assert isinstance(proc, OVSProcessor)
        assert proc.seen_class_names == ["sky", "street"]
        assert proc.prompt_templates == json.loads((d / "config.json").read_text())["prompt_templates"]


def test_fresh_interpreter_importing_only_opentrans_hf_and_transformers(saved):
    d = saved["deeplabv3"]
    code = f"""
import opentrans_hf, numpy as np
from PIL import Image
from transformers import AutoModel, AutoImageProcessor, AutoProcessor, pipeline
d = {str(d)!r}
m = AutoModel.from_pretrained(d); ip = AutoImageProcessor.from_pretrained(d); p = AutoProcessor.from_pretrained(d)
pipe = pipeline("open-vocabulary-segmentation", model=d)
out = pipe(Image.fromarray(np.zeros((20, 24, 3), np.uint8)), candidate_labels=["sky", "car"])
print(type(m).__name__, type(ip).__name__, type(p).__name__, type(pipe).__name__, out[0]["mask"].size)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["CLIPDeepLabV3ForOVS", "OVSImageProcessor", "OVSProcessor",
                                  "OpenVocabularySegmentationPipeline", "(24,", "20)"]


@pytest.mark.parametrize("name", list(CLASSES_OF))
def test_forward_on_processor_tensors_equals_forward_on_names(saved, name):
    model = AutoModel.from_pretrained(saved[name]).eval()
    proc = AutoProcessor.from_pretrained(saved[name])
    inputs = proc(images=[_image(), _image(seed=1)], text=CLASSES, return_tensors="pt")
    assert all(isinstance(v, torch.Tensor) for v in inputs.values())
    assert inputs["input_ids"].shape[0] == len(model.config.prompt_templates) * 4  # 4 names: sky, road, street, car
    assert inputs["class_ids"].tolist() == [0, 1, 1, 2]
    if name == "fcclip":
        assert inputs["seen_classes"].tolist() == [True, True, False]  # "street" is a synonym of class 1
    with torch.no_grad():
        by_tensors = model(**inputs)
        by_names = model(pixel_values=inputs["pixel_values"], class_names=NAMES)
        by_embeddings = model(pixel_values=inputs["pixel_values"], class_embeddings=by_names.text_embeddings,
                              seen_classes=model.seen_classes(NAMES))
    torch.testing.assert_close(by_tensors.logits, by_names.logits, rtol=0, atol=0)
    torch.testing.assert_close(by_embeddings.logits, by_names.logits, rtol=0, atol=0)


def test_fcclip_without_seen_classes_is_an_error_naming_them(saved):
    model = AutoModel.from_pretrained(saved["fcclip"]).eval()
    inputs = AutoProcessor.from_pretrained(saved["fcclip"])(images=_image(), text=CLASSES, return_tensors="pt")
    inputs.pop("seen_classes")
    with pytest.raises(ValueError, match="seen_classes"):
        model(**inputs)


def test_class_embeddings_of_tensors_are_cached(saved):
    model = AutoModel.from_pretrained(saved["deeplabv3"]).eval()
    inputs = AutoProcessor.from_pretrained(saved["deeplabv3"])(images=_image(), text=CLASSES, return_tensors="pt")
    calls = []
    hook = model.clip.text_model.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
    hook.remove()
    assert len(calls) == 1


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, class_embeddings):
        return self.model(pixel_values=pixel_values, class_embeddings=class_embeddings).logits


def test_a_model_traces_with_tensors_only(saved):
    model = AutoModel.from_pretrained(saved["deeplabv3"]).eval()
    x = model.get_image_processor()(_image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = model.encode_classes(NAMES)[0]
        traced = torch.jit.trace(_Logits(model), (x, text), check_trace=False)
        x2 = model.get_image_processor()(_image(seed=3), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(traced(x2, text), model(pixel_values=x2, class_names=NAMES).logits)


def test_processor_save_load_round_trip(saved, tmp_path):
    proc = AutoProcessor.from_pretrained(saved["fcclip"])
    proc.image_processor.do_reduce_labels = True
    proc.prompt_templates = ["a {}."]
    proc.save_pretrained(tmp_path)
    again = OVSProcessor.from_pretrained(tmp_path)
    assert again.prompt_templates == ["a {}."] and again.seen_class_names == ["sky", "street"]
    assert again.image_processor.to_dict() == proc.image_processor.to_dict()
    a = proc(images=_image(), text=CLASSES, return_tensors="pt")
    b = again(images=_image(), text=CLASSES, return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_processor_equals_the_evaluation_transform_and_clip_normalisation():
    ip = OVSImageProcessor(size=32)
    img = _image(45, 61)
    ours = ip(img, return_tensors="pt")["pixel_values"][0]
    ref, _ = SegmentationTransform(32, train=False)(img)
    assert torch.equal(ours, ref)  # one path: training/evaluation transforms and the processor
    square = _image(32, 32)
    clip = CLIPImageProcessor(do_resize=False, do_center_crop=False)
    theirs = torch.as_tensor(np.asarray(clip(square, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(ip(square, return_tensors="pt")["pixel_values"][0], theirs, atol=1e-5, rtol=1e-5)
    assert ip.image_mean == list(CLIP_MEAN) and ip.image_std == list(CLIP_STD)


def test_image_processor_takes_every_mode_and_shortest_edge():
    ip = OVSImageProcessor(size=24)
    rgb = _image(30, 40)
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited over white
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # I;16: 8-bit grey scaled up
    palette = rgb.convert("P")
    arrays = [np.asarray(grey), np.asarray(rgb), torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)]
    out = ip([rgb, grey, rgba, sixteen, palette, *arrays], return_tensors="pt")["pixel_values"]
    assert out.shape == (8, 3, 24, 24)
    assert sixteen.mode.startswith("I")
    torch.testing.assert_close(out[3], out[1], atol=1e-6, rtol=0)  # 16-bit grey == its 8-bit grey
    white = ip(Image.new("RGB", (40, 30), (255, 255, 255)), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out[2], white)
    torch.testing.assert_close(out[6], out[0])  # (H, W, 3) uint8 array == the PIL image
    torch.testing.assert_close(out[7], out[0])  # (3, H, W) uint8 tensor too
    wide = ip(_image(20, 50), size={"shortest_edge": 16, "longest_edge": 30})["pixel_values"]
    assert wide.shape == (1, 3, 12, 30)  # shorter side 16 -> 16 x 40, longest edge capped at 30
    mixed = ip([_image(20, 50), _image(30, 30)], size={"shortest_edge": 16})["pixel_values"]
    assert [tuple(t.shape) for t in mixed] == [(3, 16, 40), (3, 16, 16)]
    with pytest.raises(ValueError, match="different shapes"):
        ip([_image(20, 50), _image(30, 30)], size={"shortest_edge": 16}, return_tensors="pt")
    with pytest.raises(ValueError, match=r"images\[1\].*shape"):
        ip([rgb, np.zeros((2, 3, 5, 5))])


def test_segmentation_maps_are_converted_and_resized_with_the_images():
    ip = OVSImageProcessor(size={"height": 4, "width": 4}, do_reduce_labels=True)
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)  # 4 x 4
    out = ip(_image(4, 4), segmentation_maps=Image.fromarray(label), return_tensors="pt")
    expected = np.array([[255, 0], [1, 255]]).repeat(2, 0).repeat(2, 1)  # ADE20K's reduce_labels
    assert out["labels"].tolist() == [expected.tolist()]
    small = OVSImageProcessor(size=2)(_image(4, 4), segmentation_maps=[label], return_tensors="pt")["labels"]
    assert small.shape == (1, 2, 2) and small.dtype == torch.long
    with pytest.raises(ValueError, match="label map is"):
        ip(_image(4, 5), segmentation_maps=[label])


def test_post_process_semantic_segmentation_as_mask2former_does(monkeypatch):
    ip = OVSImageProcessor(size=8)
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)  # K = 3 classes + a void channel
    sizes = [(13, 21), (5, 7)]
    ref = [F.interpolate(logits[i : i + 1, :3], size=s, mode="bilinear", align_corners=False)[0].argmax(0)
           for i, s in enumerate(sizes)]
    monkeypatch.setattr(image_processing_ovs, "SCORE_CHUNK_ELEMENTS", 13 * 21)  # one class per chunk
    out = ip.post_process_semantic_segmentation({"logits": logits}, target_sizes=sizes, num_classes=3)
    assert [tuple(m.shape) for m in out] == sizes and all(torch.equal(a, b) for a, b in zip(out, ref))
    void = ip.post_process_semantic_segmentation({"logits": logits}, target_sizes=sizes, num_classes=3,
                                                 allow_void=True, void_label=-1)
    full = F.interpolate(logits[:1], size=sizes[0], mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(void[0], torch.where(full == 3, -1, full))
    assert [tuple(m.shape) for m in ip.post_process_semantic_segmentation({"logits": logits}, num_classes=3)] == \
        [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match="target sizes"):
        ip.post_process_semantic_segmentation({"logits": logits}, target_sizes=sizes[:1], num_classes=3)


def test_import_registers_and_exports():
    for name in ("OVSImageProcessor", "OVSProcessor", "OpenVocabularySegmentationPipeline", "CLIPFCCLIPConfig"):
        assert name in opentrans_hf.__all__ and hasattr(opentrans_hf, name)
    from transformers.pipelines import PIPELINE_REGISTRY

    assert "open-vocabulary-segmentation" in PIPELINE_REGISTRY.get_supported_tasks()
