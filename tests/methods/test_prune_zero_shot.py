"""The prune job reports the pruned CLIP's own dense zero-shot (original weights x final mask) beside the
dense CLIP's: in its result, counts.json, the mask's extra and its model card; skipped, with the reason,
for data other than the embedded dataset."""

import json

import numpy as np
import pytest
from PIL import Image

from opentrans_hf import SparseMask
from opentrans_hf.commands import parse_args

KEYS = ("mean_iou", "mean_iou_seen", "mean_iou_unseen")


def prune_args(clip, out, *extra):
    return parse_args("prune", ["--model_name_or_path", str(clip), "--output_dir", str(out), "--num_rounds", "1",
                                "--rate", "0.5", "--steps_per_round", "1", "--embedded_size", "8",
                                "--batch_size", "4", *extra])


def independent_zero_shot(clip_dir, mask_dir=None):
    from transformers import AutoTokenizer, CLIPModel

    from opentrans_hf.training.pretraining import zero_shot_evaluation

    clip = CLIPModel.from_pretrained(clip_dir)
    if mask_dir is not None:
        SparseMask.from_pretrained(mask_dir).apply(clip)
    zs = zero_shot_evaluation(clip, AutoTokenizer.from_pretrained(clip_dir), embedded_size=8, seed=0)
    return {k: zs[f"dense_{k}"] for k in KEYS}


@pytest.fixture(scope="module")
def pruned_run(tiny_clip_dir, tmp_path_factory):
    from opentrans_hf.commands import prune

    out = tmp_path_factory.mktemp("prune")
    return out, prune.run(prune_args(tiny_clip_dir, out))


def test_prune_reports_the_pruned_and_the_dense_clips_zero_shot(pruned_run, tiny_clip_dir):
    out, result = pruned_run
    zs = result["zero_shot"]
    assert set(zs) >= {"dense", "pruned", "examples", "split"} and zs["examples"] > 0
    for row in ("dense", "pruned"):
        assert set(zs[row]) == set(KEYS) and all(v is None or 0.0 <= v <= 1.0 for v in zs[row].values())
    # the pruned row is the ORIGINAL CLIP weights with the saved mask (not the distilled student)
    assert zs["pruned"] == pytest.approx(independent_zero_shot(tiny_clip_dir, out / "mask"), abs=1e-12)
    assert zs["dense"] == pytest.approx(independent_zero_shot(tiny_clip_dir), abs=1e-12)
    # counts.json and the mask adapter (extra + model card) carry the same numbers
    assert json.loads((out / "counts.json").read_text())["zero_shot"] == zs
    mask = SparseMask.from_pretrained(out / "mask")
    assert mask.extra["zero_shot"] == zs and mask.extra["round"] == 1
    card = (out / "mask" / "README.md").read_text()
    assert "## Zero-shot of the pruned CLIP" in card
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for label, row in (("| dense CLIP |", zs["dense"]), ("| pruned CLIP (original weights x this mask) |", zs["pruned"])):
        assert f"{label} {' | '.join(pct(row[k]) for k in KEYS)} |" in card


def test_the_zero_shot_line_says_both(pruned_run):
    from opentrans_hf.commands.prune import zero_shot_line

    _, result = pruned_run
    line = zero_shot_line(result["zero_shot"])
    assert "dense CLIP" in line and "pruned CLIP (original weights x mask)" in line
    assert f"{100 * result['zero_shot']['pruned']['mean_iou']:.2f}" in line


def test_other_data_skip_the_zero_shot_and_say_why(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import prune
    from opentrans_hf.commands.prune import zero_shot_line

    (tmp_path / "data" / "train" / "images").mkdir(parents=True)
    (tmp_path / "data" / "train" / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / "train" / "images" / f"{i}.png")
        Image.fromarray(np.full((16, 16), i % 2, dtype=np.uint8)).save(tmp_path / "data" / "train" / "labels" / f"{i}.png")
    out = tmp_path / "out"
    result = prune.run(prune_args(tiny_clip_dir, out, "--dataset", str(tmp_path / "data")))
    zs = result["zero_shot"]
    assert set(zs) == {"skipped"} and "not the embedded dataset" in zs["skipped"]
    assert json.loads((out / "counts.json").read_text())["zero_shot"] == zs
    assert SparseMask.from_pretrained(out / "mask").extra["zero_shot"] == zs
    assert "Not measured: --dataset" in (out / "mask" / "README.md").read_text()
    assert zero_shot_line(zs).startswith("pruned CLIP zero-shot skipped: --dataset")


def test_a_vision_only_checkpoint_skips_the_zero_shot(tiny_vision, tmp_path):
    from opentrans_hf.commands.prune import pruned_zero_shot

    tiny_vision.save_pretrained(tmp_path / "vision")
    args = parse_args("prune", ["--model_name_or_path", str(tmp_path / "vision")])
    zs = pruned_zero_shot(str(tmp_path / "vision"), None, args)
    assert set(zs) == {"skipped"} and "not a full CLIP" in zs["skipped"]


def test_the_demo_row_read_from_the_prune_result_is_the_row_measured_on_its_split(pruned_run, tiny_clip_dir):
    """The demo's "pruned CLIP" row, read from the prune result on the default embedded setup, equals the
    same row measured on the demo's evaluation split (the fallback for other setups)."""
    from dataclasses import replace

    from transformers import CLIPConfig

    from opentrans_hf.commands.demo import pruned_clip_row
    from opentrans_hf.data.assembly import load_training_data
    from opentrans_hf.embedded.dataset import CLASS_NAMES, HELD_OUT_CLASSES

    _, result = pruned_run
    train_args = parse_args("train", ["--model_name_or_path", str(tiny_clip_dir), "--embedded_size", "8"])
    _, evals, _ = load_training_data(train_args, CLIPConfig.from_pretrained(tiny_clip_dir).vision_config.image_size)
    split = {"embedded:validation": evals["embedded:validation"]}
    common = dict(seen_classes=[c for c in CLASS_NAMES if c not in HELD_OUT_CLASSES], max_examples=None, accelerator=None)
    read = pruned_clip_row(train_args, str(tiny_clip_dir), result, split, common)
    assert read["source"].startswith("the prune job's result")
    # an example cap above the split's size: the same examples, but measured here
    measured = pruned_clip_row(replace(train_args, max_eval_examples=100), str(tiny_clip_dir), result, split,
                               {**common, "max_examples": 100})
    assert measured["source"] == "measured on this split"
    for k in KEYS:
        assert read[k] == pytest.approx(measured[k], abs=1e-12)


def test_a_finished_run_resumed_keeps_its_mask_metadata_and_reports_again(tiny_clip_dir, tmp_path):
    """Re-running a finished prune job (it resumes after its last round, nothing to train) writes the
    same final mask with what made it (method, round, ...) and the same zero-shot."""
    from opentrans_hf.commands import prune

    first = prune.run(prune_args(tiny_clip_dir, tmp_path))
    saved = SparseMask.from_pretrained(tmp_path / "mask")
    again = prune.run(prune_args(tiny_clip_dir, tmp_path))
    mask = SparseMask.from_pretrained(tmp_path / "mask")
    assert mask == saved and mask.method == "imp-global" and mask.extra == saved.extra
    assert again["zero_shot"] == first["zero_shot"]
