"""A local copy of scene_parse_150 as the Hub ships it (``scene_parsing/{train,validation}/0000.parquet`` beside
``instance_segmentation/``) through the jobs, with no label flags: ``train --dataset DIR``, ``evaluate
--datasets DIR:validation`` (scored as the Hub copy ``ade150`` is, as the model's own sliding-window
predictions score by hand, and as the dataset ``prepare-dataset ade150 --raw_dir DIR`` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as train
from opentrans_hf.data.benchmarks import get_benchmark

SIZE = 30  # the tiny CLIP's image size


def write_copy(root: Path) -> dict:
    """scene_parse_150's parquet conversion in miniature; returns ``{split: [(image, annotation), ...]}`` of
    its scene_parsing configuration (annotation: 0 = other, 1..150 the classes)."""
    written = {}
    for config, seed in (("scene_parsing", 0), ("instance_segmentation", 1)):
        for split, n in (("train", 4), ("validation", 3)):
            rng = np.random.default_rng([seed, n])
            rows = []
            for i in range(n):
                image = rng.integers(0, 256, (SIZE, SIZE + 6, 3), dtype=np.uint8)
                label = np.zeros((SIZE, SIZE + 6), np.uint8)
                label[:, 4:14] = 3                       # sky
                label[:, 14:24] = 1 + i                  # wall, building, ...
                label[15:, 24:] = 13                     # person
                label[:15, 24:] = rng.integers(0, 151, (15, 12))
                rows.append((image, label))
            path = root / config / split / "0000.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict({"image": [Image.fromarray(a) for a, _ in rows],
                               "annotation": [Image.fromarray(b) for _, b in rows]},
                              features=Features(image=ImageFeature(), annotation=ImageFeature())).to_parquet(str(path))
            if config == "scene_parsing":
                written[split] = rows
    return written


def evaluate(model_dir, dataset, out, capsys):
    rc = cli_main(["evaluate", "--model", str(model_dir), "--datasets", dataset, "--shortest_side", "40",
                   "--max_size", "60", "--batch_size", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (row,) = json.loads(out.read_text())["results"].values()
    return row


def hand_scores(model_dir, rows):
    """mIoU and accuracy of the model's sliding-window predictions (shorter side 40, longer at most 60) on
    ``rows``, scored at the labels' size with ADE's raw convention (0 ignored, k is class k - 1)."""
    from opentrans_hf.data.transforms import SegmentationTransform
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    model = CLIPDeepLabV3ForOVS.from_pretrained(model_dir).eval()  # train's default framework
    prompts = [p[0] if len(p) == 1 else p for p in get_benchmark("ade150").class_prompts]
    transform = SegmentationTransform(40, resize="shortest_side", max_size=60)
    confusion = torch.zeros(150, 150, dtype=torch.long)
    for image, annotation in rows:
        x, _ = transform(Image.fromarray(image))
        pred = model.predict_sliding(x, prompts)
        label = torch.from_numpy(annotation.astype(np.int64)) - 1
        pred = torch.nn.functional.interpolate(pred[None, None].float(), size=label.shape, mode="nearest")[0, 0].long()
        keep = label >= 0
        confusion += torch.bincount(label[keep] * 150 + pred[keep], minlength=150 * 150).view(150, 150)
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()), float(inter.sum() / confusion.sum())


def test_a_parquet_copy_of_scene_parse_150_trains_and_evaluates_as_the_hub_copy(tmp_path, tiny_clip_dir, capsys,
                                                                                 monkeypatch):
    root = tmp_path / "scene_parse_150"
    written = write_copy(root)

    # train: the copy's names (ade150, with synonyms), reduce_labels and columns, from the folder alone
    metrics = train(parse_args("train", ["--model_name_or_path", str(tiny_clip_dir), "--dataset", str(root),
                                         "--output_dir", str(tmp_path / "run"), "--batch_size", "2", "--max_steps", "2",
                                         "--max_eval_examples", "2"]))
    assert metrics["train_classes"] == get_benchmark("ade150").class_names and metrics["holdout_classes"] == []
    assert list(metrics["eval"]) == [f"{root}:validation"]  # its validation split, scored while training
    model_dir = tmp_path / "run" / "model"

    # evaluate the copy: ade150's protocol, names and conventions, and the scores computed by hand
    row = evaluate(model_dir, f"{root}:validation", tmp_path / "copy.json", capsys)
    assert len(row["per_category_iou"]) == 150 and "benchmark ade150" in row["vocabulary"]
    assert "reduce_labels" in row["vocabulary"] and "shortest side 40" in row["protocol"]
    miou, accuracy = hand_scores(model_dir, written["validation"])
    assert row["mean_iou"] == pytest.approx(miou, abs=1e-9)
    assert row["overall_accuracy"] == pytest.approx(accuracy, abs=1e-9)

    # the Hub id scores the same when the Hub answers with these files
    import datasets

    real = datasets.load_dataset
    asked = []

    def load_dataset(path, *args, revision=None, **kwargs):
        asked.append((path, revision, kwargs.get("data_dir")))
        return real(str(root) if path == "scene_parse_150" else path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = evaluate(model_dir, "ade150:validation", tmp_path / "hub.json", capsys)
    assert ("scene_parse_150", "refs/convert/parquet", "scene_parsing") in asked
    monkeypatch.setattr(datasets, "load_dataset", real)
    for key in ("mean_iou", "overall_accuracy", "per_category_iou", "vocabulary", "protocol"):
        assert hub[key] == row[key], key

    # and so does the dataset prepare-dataset writes from the copy (label i = class i, 255 elsewhere)
    rc = cli_main(["prepare-dataset", "ade150", "--raw_dir", str(root), "--output_dir", str(tmp_path / "prepared"),
                   "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    prepared = evaluate(model_dir, f"{tmp_path / 'prepared'}:validation", tmp_path / "prepared.json", capsys)
    assert "prepared" in prepared["vocabulary"]
    for key in ("mean_iou", "overall_accuracy", "per_category_iou"):
        assert prepared[key] == pytest.approx(row[key], abs=1e-12), key
