"""Iterative magnitude pruning: the sparsity schedule, masks saved every round, resume, 2 processes."""

import json
from pathlib import Path

import pytest
from conftest import launch_two_processes
from transformers import CLIPVisionModel

from opentrans_hf import IMPConfig, SparseMask, iterative_magnitude_prune
from opentrans_hf.data import SegmentationTransform, embedded_dataset
from opentrans_hf.data.splits import SegmentationSplit, make_loader
from opentrans_hf.methods.sparse_mask import distillation_loss


def loader(size=30, n=8):
    ds = embedded_dataset("train", num_train=n, image_size=size)
    split = SegmentationSplit(ds, "image", "label", [], SegmentationTransform(size, train=True))
    return make_loader(split, batch_size=4, shuffle=True)


def test_schedule_rounds_and_paper_subnetwork():
    assert IMPConfig().num_rounds == 22 and IMPConfig().sparsity_after(22) == pytest.approx(0.9015, abs=1e-4)
    assert IMPConfig(target_sparsity=0.5).num_rounds == 7  # 1 - 0.9^7 = 0.522
    with pytest.raises(ValueError, match="rate must be in"):
        IMPConfig(rate=1.5)


def test_imp_reaches_schedule_saves_rounds_and_resumes(tmp_path, tiny_clip_dir):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    cfg = IMPConfig(rate=0.2, num_rounds=2, steps_per_round=2, learning_rate=1e-3, output_dir=str(tmp_path))
    mask = iterative_magnitude_prune(model, loader(), cfg, progress=False)
    assert mask.sparsity == pytest.approx(cfg.sparsity_after(2), abs=1e-3)
    for r in (1, 2):
        saved = SparseMask.from_pretrained(tmp_path / f"round_{r:02d}")
        assert saved.sparsity == pytest.approx(cfg.sparsity_after(r), abs=1e-3)
    r1, r2 = (SparseMask.from_pretrained(tmp_path / f"round_{r:02d}") for r in (1, 2))
    assert all(not (r2.masks[n] & ~r1.masks[n]).any() for n in r1.masks)  # nested: pruned stays pruned
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["round"] == 2 and len(state["history"]) == 2 and state["history"][0]["loss"] > 0
    for name, m in mask.masks.items():  # fine-tuning kept the pruned weights at zero
        assert (model.get_parameter(name)[~m] == 0).all()

    # resume: a fresh model continues from round 2 with the saved student weights and mask
    cfg3 = IMPConfig(rate=0.2, num_rounds=3, steps_per_round=2, learning_rate=1e-3, output_dir=str(tmp_path))
    fresh = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    mask3 = iterative_magnitude_prune(fresh, loader(), cfg3, progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["round"] == 3 and [h["round"] for h in state["history"]] == [1, 2, 3]
    assert mask3.sparsity == pytest.approx(cfg3.sparsity_after(3), abs=1e-3)
    assert all(not (mask3.masks[n] & ~mask.masks[n]).any() for n in mask.masks)


def test_distillation_is_zero_for_the_dense_model_and_uses_regions(tiny_clip_dir):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    batch = next(iter(loader()))
    cfg = IMPConfig(region_weight=0.0)
    assert distillation_loss(model, model, batch, cfg).item() == pytest.approx(0.0, abs=1e-5)
    with_regions = distillation_loss(model, model, batch, IMPConfig())
    assert with_regions.item() > 0.01 and with_regions.requires_grad


@pytest.mark.multiprocess
@pytest.mark.slow
def test_prune_script_with_two_processes(tmp_path, tiny_clip_dir):
    script = Path(__file__).parents[2] / "scripts" / "prune.py"
    res = launch_two_processes(script, "--model_name_or_path", tiny_clip_dir, "--num_rounds", "2", "--steps_per_round", "2",
                               "--batch_size", "2", "--embedded_size", "8", "--output_dir", tmp_path, port=29623)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mask = SparseMask.from_pretrained(tmp_path / "mask")
    assert mask.sparsity == pytest.approx(0.19, abs=1e-3)
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["effective_params"] < counts["params"] and counts["effective_macs"] < counts["macs"]
    assert counts["num_processes"] == 2  # really distributed (gloo on CPU), not two lone processes
    assert (tmp_path / "sparsity.png").read_bytes()[:4] == b"\x89PNG"
