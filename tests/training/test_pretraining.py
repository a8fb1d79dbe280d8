"""The pretrained embedded CLIP: captioned data v2, `pretrain-clip`, the cache the jobs' default comes from,
the training-free dense zero-shot model, and DeepLabV3's CLIP residual."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from opentrans_hf.cli import main
from opentrans_hf.embedded.dataset import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    DATA_VERSION,
    HELD_OUT_CLASSES,
    make_synthetic_segmentation_dataset,
)

FAST = ["--size", "tiny", "--max_steps", "3", "--num_examples", "16", "--batch_size", "8", "--no_progress"]


def test_data_v2_classes_and_captions():
    assert DATA_VERSION == 2 and len(CLASS_NAMES) >= 16 and len(HELD_OUT_CLASSES) >= 4
    assert set(HELD_OUT_CLASSES) < set(CLASS_NAMES)
    ds = make_synthetic_segmentation_dataset(60, image_size=32, seed=3)
    assert ds.features["caption"].dtype == "string"
    single = 0
    for ex in ds:
        present = sorted(np.unique(np.asarray(ex["label"])).tolist())
        assert present == sorted(ex["classes"])
        text = ex["caption"]
        named = [n for n in CLASS_NAMES if n in text]
        # exactly the classes present are named ("brick wall" is the only name containing another word)
        assert sorted(named) == sorted(CLASS_NAMES[c] for c in present), (text, present)
        assert any(text == t.format(text[len(t.split("{}")[0]):len(text) - len(t.split("{}")[1])])
                   for t in CAPTION_TEMPLATES)
        single += len(present) == 1
    assert single >= 3  # some single-class images, the clearest caption/image pairs
    assert len(set(ds["caption"])) > 50  # several phrasings, shuffled order


def test_pretrain_clip_writes_a_normal_clip_checkpoint(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    out = tmp_path / "clip"
    assert main(["pretrain-clip", *FAST, "--output_dir", str(out)]) == 0
    clip = CLIPModel.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert clip.config.vision_config.hidden_size == 32 and tok("a photo of snow.")["input_ids"]
    record = json.loads((out / "pretraining.json").read_text())
    assert record["size"] == "tiny" and record["max_steps"] == 3 and record["data_version"] == DATA_VERSION
    assert record["held_out_classes"] == HELD_OUT_CLASSES
    zs = record["zero_shot"]
    for key in ("dense_mean_iou", "dense_mean_iou_seen", "dense_mean_iou_unseen", "presence_accuracy",
                "presence_accuracy_unseen"):
        assert 0.0 <= zs[key] <= 1.0
    card = (out / "README.md").read_text()
    assert f"{100 * zs['dense_mean_iou_unseen']:.2f}" in card and f"{100 * zs['presence_accuracy_unseen']:.2f}" in card
    # the jobs take it as --model_name_or_path
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    model = CLIPDeepLabV3ForOVS.from_clip(out, seen_class_names=CLASS_NAMES[:3])
    assert model.predict(torch.zeros(1, 3, 30, 30), CLASS_NAMES)[0].shape == (30, 30)


def test_pretraining_learns_from_captions(tmp_path):
    """The three losses fall (a tiny CLIP, 40 steps): the recipe trains, it does not only run."""
    from opentrans_hf.training.pretraining import pretrain_clip

    record = pretrain_clip(tmp_path / "clip", "tiny", 0, max_steps=40, num_examples=128, progress=False)
    first, last = record["loss_history"][0], record["loss_history"][-1]
    assert last["step"] == 39
    for key in ("contrastive", "patch", "presence"):
        assert last[key] < first[key], (key, first, last)


def test_pretrain_clip_bad_arguments(tmp_path, capsys):
    assert main(["pretrain-clip", "--max_steps", "0", "--output_dir", str(tmp_path)]) == 2
    assert main(["pretrain-clip", "--max_steps", "5"]) == 2  # a custom recipe never goes into the shared cache
    assert main(["pretrain-clip", "--size", "huge"]) == 2
    err = capsys.readouterr().err
    assert "--max_steps must be >= 1, got 0" in err and "give --output_dir" in err and "huge" in err


@pytest.fixture
def tiny_recipe(monkeypatch, tmp_path):
    from opentrans_hf.training import pretraining

    monkeypatch.setenv("OPENTRANS_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretraining.PRETRAINING_DEFAULTS, "tiny",
                        dict(max_steps=2, batch_size=4, num_examples=8, learning_rate=1e-3))
    return pretraining


def test_cache_builds_once_per_size_seed_and_data_version(tiny_recipe, monkeypatch):
    pretraining = tiny_recipe
    path = pretraining.pretrained_clip("tiny", 0, progress=False)
    assert path == Path(os.environ["OPENTRANS_HF_CACHE"]) / f"pretrained-clip-tiny-seed0-data-v{DATA_VERSION}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("the cached CLIP was built again")

    monkeypatch.setattr(pretraining, "pretrain_clip", fail)
    assert pretraining.pretrained_clip("tiny", 0) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["pretrain-clip", "--size", "tiny", "--no_progress"]) == 0  # the CLI finds the same entry
    with pytest.raises(AssertionError, match="built again"):  # another seed or data version is another entry
        pretraining.pretrained_clip("tiny", 1)
    monkeypatch.setattr(pretraining, "DATA_VERSION", DATA_VERSION + 1)
    with pytest.raises(AssertionError, match="built again"):
        pretraining.pretrained_clip("tiny", 0)


def test_default_clip_is_the_cached_pretrained_one(tiny_recipe, monkeypatch):
    pretraining = tiny_recipe
    calls = []
    monkeypatch.setattr(pretraining, "pretrained_clip", lambda size, seed, state=None: calls.append((size, seed)) or Path("/x"))
    assert pretraining.default_clip(None) == "/x" and calls == [("small", 0)]
    assert pretraining.default_clip("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16" and len(calls) == 1


BUILD = """
import sys
from opentrans_hf.training import pretraining
pretraining.PRETRAINING_DEFAULTS["tiny"] = dict(max_steps=int(sys.argv[1]), batch_size=4, num_examples=8, learning_rate=1e-3)
print(pretraining.pretrained_clip("tiny", 0, progress=False), flush=True)
"""


def _build(tmp_path, steps):
    env = {**os.environ, "OPENTRANS_HF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "OPENTRANS_HF_VERBOSITY": "info"}  # the library says when it builds (on stderr)
    return subprocess.Popen([sys.executable, "-c", BUILD, str(steps)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_build_leaves_no_entry_and_a_waiting_builder_reuses_the_first(tmp_path):
    entry = tmp_path / "cache" / f"pretrained-clip-tiny-seed0-data-v{DATA_VERSION}"
    lock = tmp_path / "cache" / f".{entry.name}.lock"
    proc = _build(tmp_path, 100_000)  # would run for hours
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # inside pretraining
    proc.kill()  # kill -9
    proc.wait()
    assert lock.exists() and not entry.exists()
    # the lock died with the process: a new build takes it at once; a second builder waits and reuses it
    first = _build(tmp_path, 2)
    line = ""
    while not line.startswith("building the pretrained embedded CLIP"):  # then it holds the lock
        line = first.stderr.readline()
        assert line, "the first builder ended without building"
    second = _build(tmp_path, 100_000)  # would run for hours if it built instead of waiting and reusing
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2
    assert out1.strip().splitlines()[-1] == out2.strip().splitlines()[-1] == str(entry)
    assert "building" not in out2
    assert json.loads((entry / "pretraining.json").read_text())["max_steps"] == 2


def test_dense_zero_shot_model_and_the_deeplab_clip_residual(tiny_clip_dir):
    """An untrained DeepLabV3 made by from_clip is exactly CLIP's training-free dense zero-shot model; a
    config without the setting (a model saved before it existed) keeps the plain head."""
    from opentrans_hf.models import CLIPDeepLabV3Config, CLIPDeepLabV3ForOVS
    from opentrans_hf.models.zeroshot import CLIPDenseZeroShot

    names = ["sky", "grass", "snow", "road"]
    x = torch.randn(3, 3, 30, 30)
    zero = CLIPDenseZeroShot.from_pretrained(str(tiny_clip_dir))
    model = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, seen_class_names=names[:2]).eval()
    assert model.config.clip_residual is True and torch.count_nonzero(model.pixel_embed.weight) == 0
    assert torch.equal(torch.stack(model.predict(x, names, allow_void=False)), zero.predict(x, names))
    assert zero.patch_logits(x, names).shape == (3, 4, 15, 15)
    plain = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, clip_residual=False)
    assert plain.config.clip_residual is False and torch.count_nonzero(plain.pixel_embed.weight) > 0
    assert CLIPDeepLabV3Config().clip_residual is False
    with pytest.raises(ValueError, match="class_names is empty"):
        zero.predict(x, [])


def test_config_overrides_are_checked_as_arguments(tiny_clip_dir, tmp_path, capsys):
    from opentrans_hf.models import CLIPDeepLabV3ForOVS
    from opentrans_hf.training.trainer import config_overrides

    assert config_overrides(CLIPDeepLabV3ForOVS, "clip_residual=false,aspp_channels=32") == {
        "clip_residual": False, "aspp_channels": 32}
    rc = main(["train", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path),
               "--config_overrides", "aspp_chanels=32"])
    assert rc == 2 and "aspp_chanels" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pretrain_clip_under_accelerate_launch_with_two_processes(tmp_path):
    from conftest import launch_two_processes
    from transformers import CLIPModel

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "clip"
    res = launch_two_processes(root / "scripts" / "pretrain_clip.py", *FAST, "--output_dir", out, port=29571)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "pretraining.json").read_text())
    assert record["processes"] == 2 and record["max_steps"] == 3
    CLIPModel.from_pretrained(out)
    assert res.stdout.count("pretrained CLIP (tiny") == 1  # the main process reports once


def test_a_diverging_pretraining_stops_without_writing(tmp_path, monkeypatch, capsys):
    from opentrans_hf.training import pretraining

    real = pretraining.caption_losses
    monkeypatch.setattr(pretraining, "caption_losses",
                        lambda *a: {**real(*a), "patch": torch.tensor(float("nan"), requires_grad=True)})
    out = tmp_path / "clip"
    assert main(["pretrain-clip", *FAST, "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pretraining diverged at step 0" in err and "nothing was written" in err
    assert not out.exists() or not any(out.iterdir())
    assert main(["pretrain-clip", "--size", "tiny", "--num_examples", "8", "--output_dir", str(out)]) == 2
    assert "--batch_size 16 is larger than --num_examples 8" in capsys.readouterr().err
