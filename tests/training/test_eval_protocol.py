"""Evaluation as the field does it: shortest-side resize, sliding-window inference scored at the label map's
original size, and the model cost (parameters, FLOPs per image, images/s) in ``opentrans-hf evaluate``.

The references here are computed independently of the library's code paths: windows are placed by a naive
loop, scores averaged by hand, metrics computed by torchmetrics."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opentrans_hf.commands import ArgumentError, parse_args
from opentrans_hf.data.transforms import SegmentationTransform, shortest_side_size
from opentrans_hf.models.modeling_ovs import sliding_windows
from opentrans_hf.training.evaluation import resolve_eval_resize

SIZE = 30  # the tiny CLIP's image size (patch 2): the sliding window
NAMES = ["sky", "grass", "lava"]
# (height, width) of the test images: non-square, different sizes
SHAPES = [(37, 52), (61, 45), (30, 90), (24, 40), (50, 33)]


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    path = tmp_path_factory.mktemp("ovs") / "model"
    torch.manual_seed(0)
    CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=SIZE, seen_class_names=NAMES[:2]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    return CLIPDeepLabV3ForOVS.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image/label folder (validation split) with an id2label.json: images of different non-square
    sizes, labels in blocks of 0..2 with some 255 (unlabelled) pixels."""
    root = tmp_path_factory.mktemp("folder") / "shapes"
    for sub in ("images", "labels"):
        (root / "validation" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SHAPES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "validation" / "images" / f"{i}.png")
        blocks = rng.integers(0, 3, (h // 8 + 1, w // 8 + 1)).astype(np.uint8)
        label = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))[:h, :w]
        label[:3, :5] = 255
        Image.fromarray(label).save(root / "validation" / "labels" / f"{i}.png")
    (root / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(NAMES)}))
    return root


def naive_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis, walked one step at a time: every ``stride`` pixels, the last window
    pushed back to end at the edge (the image is padded to the window when smaller)."""
    length = max(length, window)
    starts, p = [], 0
    while True:
        start = min(p, length - window)
        starts.append(start)
        if start + window >= length:
            return starts
        p += stride


def brute_force(model, x, names, window, stride):
    """Run every window on its own (batch 1), sum the scores into a padded buffer, divide by the count."""
    k = len(names)
    _, h, w = x.shape
    hp, wp = max(h, window), max(w, window)
    padded = torch.zeros(3, hp, wp)
    padded[:, :h, :w] = x
    total, count = torch.zeros(k, hp, wp), torch.zeros(hp, wp)
    with torch.no_grad():
        for top in naive_starts(h, window, stride):
            for left in naive_starts(w, window, stride):
                crop = padded[None, :, top : top + window, left : left + window]
                scores = model.semantic_scores(model(pixel_values=crop, class_names=names), k)[0, :k]
                total[:, top : top + window, left : left + window] += scores
                count[top : top + window, left : left + window] += 1
    assert (count[:h, :w] > 0).all()
    return (total / count)[:, :h, :w].argmax(0)


# --- resize ------------------------------------------------------------------------------------------


def test_shortest_side_resize_keeps_aspect_caps_long_side_and_leaves_the_label_alone():
    assert shortest_side_size((480, 640), 800, 1333) == (800, 1067)
    assert shortest_side_size((640, 480), 800, 1333) == (1067, 800)
    assert shortest_side_size((100, 1000), 800, 1333) == (133, 1333)  # the cap wins
    assert shortest_side_size((1024, 2048), 1024, 2560) == (1024, 2048)  # Cityscapes: as is
    image = np.random.default_rng(1).integers(0, 255, (37, 52, 3), dtype=np.uint8)
    label = np.random.default_rng(2).integers(0, 3, (37, 52)).astype(np.uint8)
    x, y = SegmentationTransform(40, resize="shortest_side", max_size=70)(image, label)
    assert x.shape == (3, 40, 56) and y.shape == (37, 52) and np.array_equal(y.numpy(), label)
    x, y = SegmentationTransform(40)(image, label)  # the default is unchanged: square
    assert x.shape == (3, 40, 40) and y.shape == (40, 40)
    with pytest.raises(ValueError, match="evaluation mode"):
        SegmentationTransform(40, train=True, resize="shortest_side")


def test_protocol_defaults_benchmarks_shortest_side_others_square():
    assert resolve_eval_resize(None) == ("square", None, None)
    assert resolve_eval_resize("ade150") == ("shortest_side", 800, 1333)
    assert resolve_eval_resize("cityscapes19") == ("shortest_side", 1024, 2560)
    assert resolve_eval_resize("cityscapes19", "square") == ("square", None, None)
    assert resolve_eval_resize(None, "shortest_side") == ("shortest_side", 800, 1333)
    assert resolve_eval_resize(None, None, 512, 2048) == ("shortest_side", 512, 2048)
    with pytest.raises(ValueError, match="max_size"):
        resolve_eval_resize(None, None, 1500)


def test_flags_that_contradict_are_argument_errors(model_dir):
    base = ["--model", str(model_dir)]
    with pytest.raises(ArgumentError, match="--eval_resize square"):
        parse_args("evaluate", base + ["--eval_resize", "square", "--shortest_side", "512"])
    with pytest.raises(ArgumentError, match="--max_size 100 is smaller"):
        parse_args("evaluate", base + ["--shortest_side", "512", "--max_size", "100"])
    with pytest.raises(ArgumentError, match="sliding_stride must be >= 1"):
        parse_args("evaluate", base + ["--sliding_stride", "0"])


# --- sliding windows ---------------------------------------------------------------------------------


def test_windows_cover_every_pixel_and_stay_inside():
    for h, w in [(30, 30), (31, 30), (47, 83), (20, 70), (90, 61), (5, 5)]:
        for stride in (1, 7, 20, 30):
            boxes = sliding_windows(h, w, SIZE, stride)
            hp, wp = max(h, SIZE), max(w, SIZE)
            count = torch.zeros(hp, wp)
            for top, left in boxes:
                assert 0 <= top <= hp - SIZE and 0 <= left <= wp - SIZE
                count[top : top + SIZE, left : left + SIZE] += 1
            assert (count > 0).all(), (h, w, stride)
            assert len(set(boxes)) == len(boxes)
            assert boxes == [(t, left) for t in naive_starts(h, SIZE, stride) for left in naive_starts(w, SIZE, stride)]


def test_window_sized_image_equals_predict(model):
    x = torch.randn(3, SIZE, SIZE)
    ref = model.predict(x[None], NAMES, allow_void=False)[0]
    assert torch.equal(model.predict_sliding(x, NAMES), ref)
    assert len(ref.unique()) > 1  # a prediction with something to compare


@pytest.mark.parametrize("shape,stride", [((47, 83), None), ((20, 70), 10), ((64, 31), 30)])
def test_larger_non_square_image_equals_brute_force_average(model, shape, stride):
    x = torch.randn(3, *shape)
    ref = brute_force(model, x, NAMES, SIZE, stride or SIZE * 2 // 3)
    one = model.predict_sliding(x, NAMES, stride=stride, batch_size=1)
    assert one.shape == shape and one.dtype == torch.long
    assert torch.equal(one, ref)
    batched = model.predict_sliding(x, NAMES, stride=stride, batch_size=4)  # windows batched: same up to float noise
    assert (batched == ref).float().mean() > 0.999
    assert len(ref.unique()) > 1
    with pytest.raises(ValueError, match="stride"):
        model.predict_sliding(x, NAMES, stride=SIZE + 1)


# --- end to end --------------------------------------------------------------------------------------


def test_evaluate_shortest_side_matches_torchmetrics_at_original_resolution(model_dir, model, folder, tmp_path, capsys):
    from torchmetrics.classification import MulticlassJaccardIndex

    from opentrans_hf.commands import evaluate

    side, cap, stride = 40, 70, 20
    out = tmp_path / "eval.json"
    results = evaluate.run(parse_args("evaluate", [
        "--model", str(model_dir), "--datasets", f"{folder}:validation", "--eval_resize", "shortest_side",
        "--shortest_side", str(side), "--max_size", str(cap), "--sliding_stride", str(stride), "--batch_size", "3",
        "--out", str(out)]))
    printed = capsys.readouterr().out
    res = results[f"{folder}:validation"]

    # the reference: the model's own predict_sliding per image, nearest-resized to the ORIGINAL label size
    tf = SegmentationTransform(side, resize="shortest_side", max_size=cap)
    jac = MulticlassJaccardIndex(num_classes=3, ignore_index=255, average="none")
    confusion = torch.zeros(3, 3, dtype=torch.long)
    windows = []
    for i, (h, w) in enumerate(SHAPES):
        image = Image.open(folder / "validation" / "images" / f"{i}.png")
        label = torch.from_numpy(np.array(Image.open(folder / "validation" / "labels" / f"{i}.png"))).long()
        x, _ = tf(image)
        windows.append(len(naive_starts(x.shape[1], SIZE, stride)) * len(naive_starts(x.shape[2], SIZE, stride)))
        pred = model.predict_sliding(x, NAMES, stride=stride, batch_size=3)
        pred = F.interpolate(pred[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        jac.update(pred[None], label[None])
        keep = label != 255
        confusion += torch.bincount(label[keep] * 3 + pred[keep], minlength=9).reshape(3, 3)
    np.testing.assert_allclose(res["per_category_iou"], jac.compute().numpy(), atol=1e-6)
    assert res["mean_iou"] == pytest.approx(float(jac.compute().nanmean()), abs=1e-6)
    assert res["overall_accuracy"] == pytest.approx(int(confusion.diag().sum()) / int(confusion.sum()), abs=1e-12)
    assert min(windows) < max(windows)  # sizes differ (one image is narrower than the window after the cap)
    assert "shortest side 40 (max 70)" in res["protocol"] and "stride 20" in res["protocol"]

    # the cost: parameters, FLOPs per image = FLOPs per window x windows per image, throughput
    cost = json.loads(out.read_text())["cost"]
    assert cost["params"] == sum(p.numel() for p in model.parameters()) == cost["params_effective"]
    row = cost["datasets"][f"{folder}:validation"]
    assert row["windows_per_image"] == pytest.approx(sum(windows) / len(windows))
    assert row["flops_per_window"] > 0
    assert cost["flops_per_image"] == pytest.approx(row["flops_per_window"] * sum(windows) / len(windows))
    assert cost["images_per_second"] > 0 and row["images_timed"] == len(SHAPES)
    assert cost["batch_size"] == 3 and cost["device"] == "cpu" and cost["processes"] == 1
    assert "shortest side 40" in cost["resolution"]
    assert "model cost" in printed and "FLOPs / image" in printed and "windows)" in printed
    assert (tmp_path / "eval_cost.md").read_text().startswith("model cost")


def test_evaluate_square_default_reports_cost_at_the_square_size(model_dir, model, folder, tmp_path):
    from opentrans_hf.commands import evaluate
    from opentrans_hf.training.cost import forward_flops

    out = tmp_path / "eval.json"
    results = evaluate.run(parse_args("evaluate", ["--model", str(model_dir), "--datasets", f"{folder}:validation",
                                                   "--out", str(out)]))
    assert "protocol" not in results[f"{folder}:validation"]  # the square default: output as before
    cost = json.loads(out.read_text())["cost"]
    assert cost["resolution"] == f"{SIZE}x{SIZE} (square resize)"
    assert cost["flops_per_image"] == forward_flops(model, NAMES, SIZE, SIZE) > 0


def test_effective_params_count_the_sparse_mask(model_dir, tmp_path):
    from opentrans_hf.methods.sparse_mask.magnitude import magnitude_prune
    from opentrans_hf.models import CLIPDeepLabV3ForOVS
    from opentrans_hf.training.cost import load_model_mask, parameter_counts

    m = CLIPDeepLabV3ForOVS.from_pretrained(model_dir)
    mask = magnitude_prune(m.clip.vision_model, 0.5)
    mask.apply(m, strict=True)
    path = tmp_path / "sparse"
    m.save_pretrained(path)
    mask.save_pretrained(path / "mask_adapter")
    loaded, where = load_model_mask(path)
    assert loaded == mask and where == str(path / "mask_adapter")
    counts = parameter_counts(CLIPDeepLabV3ForOVS.from_pretrained(path), loaded)
    removed = sum(int((~k).sum()) for k in mask.masks.values())
    assert counts["params"] == sum(p.numel() for p in m.parameters())
    assert counts["params_effective"] == counts["params"] - removed
    assert load_model_mask(model_dir) == (None, None)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluate_under_two_processes_equals_one(model_dir, folder, tmp_path):
    from pathlib import Path

    from conftest import launch_two_processes

    from opentrans_hf.commands import evaluate

    flags = ["--model", str(model_dir), "--datasets", f"{folder}:validation", "--shortest_side", "40", "--max_size", "70",
             "--sliding_stride", "20"]
    one = evaluate.run(parse_args("evaluate", flags))
    script = Path(__file__).parents[2] / "scripts" / "evaluate.py"
    res = launch_two_processes(script, *flags, "--out", tmp_path / "ddp.json", port=29657)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("model cost") == 1  # only the main process prints
    saved = json.loads((tmp_path / "ddp.json").read_text())
    two = saved["results"][f"{folder}:validation"]
    assert two["mean_iou"] == pytest.approx(one[f"{folder}:validation"]["mean_iou"], abs=1e-12)
    cost = saved["cost"]
    assert cost["processes"] == 2 and cost["datasets"][f"{folder}:validation"]["images_timed"] == 3  # its own shard
    assert cost["datasets"][f"{folder}:validation"]["images_evaluated"] == len(SHAPES)
