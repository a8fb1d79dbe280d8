"""make_random_clip checkpoints and the `opentrans-hf analyze` command."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel

from opentrans_hf import CLIP_SIZES, SpectralReport, make_random_clip
from opentrans_hf.cli import main
from opentrans_hf.embedded.random_clip import random_clip_config


def test_random_clip_loads_and_tokenizes(tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    enc = tok(["a photo of a cat.", "a photo of a traffic light."], padding=True, return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc.input_ids[1].tolist())[:4] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>"]
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True).strip() == "a photo of a cat ."
    assert enc.input_ids.max() < model.config.text_config.vocab_size
    text = model.get_text_features(**enc).pooler_output
    image = model.get_image_features(pixel_values=torch.randn(2, 3, 30, 30)).pooler_output
    assert text.shape == image.shape == (2, 16)
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)  # the vision tower alone, same weights
    assert torch.equal(vision.encoder.layers[0].mlp.fc1.weight, model.vision_model.encoder.layers[0].mlp.fc1.weight)


def test_random_clip_is_seeded(tmp_path):
    a = CLIPModel.from_pretrained(make_random_clip(tmp_path / "a", "tiny", seed=5))
    b = CLIPModel.from_pretrained(make_random_clip(tmp_path / "b", "tiny", seed=5))
    c = CLIPModel.from_pretrained(make_random_clip(tmp_path / "c", "tiny", seed=6))
    w = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_real_checkpoint_shapes():
    b16 = random_clip_config("vit-b16")
    assert (b16.vision_config.hidden_size, b16.vision_config.num_hidden_layers, b16.vision_config.patch_size) == (768, 12, 16)
    assert (b16.text_config.hidden_size, b16.text_config.vocab_size, b16.projection_dim) == (512, 49408, 512)
    l14 = random_clip_config("vit-l14")
    assert (l14.vision_config.hidden_size, l14.vision_config.num_hidden_layers, l14.vision_config.patch_size) == (1024, 24, 14)
    assert set(CLIP_SIZES) >= {"tiny", "vit-b16", "vit-l14"}
    with pytest.raises(ValueError, match="unknown CLIP size 'vit-h14'"):
        random_clip_config("vit-h14")


def test_cli_analyze_size_name_writes_report_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "alpha.png"
    assert main(["analyze", "tiny", "--estimator", "ww", "--out", str(out), "--plot", str(png), "--no-progress"]) == 0
    report = SpectralReport.from_json(out)
    assert report.estimator == "ww" and report.model_class == "CLIPVisionModel"
    assert "embeddings.position_embedding" in report.alphas
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "encoder.layers.1.mlp.fc2" in printed and str(out) in printed


def test_cli_local_directory_and_towers(tmp_path, tiny_clip_dir):
    out = tmp_path / "all.json"
    assert main(["analyze", str(tiny_clip_dir), "--tower", "all", "--out", str(out), "--no-progress",
                 "--exclude-modules", "re:text_model\\..*"]) == 0
    names = SpectralReport.from_json(out).alphas
    assert "vision_model.encoder.layers.0.mlp.fc1" in names and not any(n.startswith("text_model.") for n in names)
    assert main(["analyze", str(tiny_clip_dir), "--target-modules", "fc1,fc2", "--out", str(out), "--no-progress"]) == 0
    assert set(SpectralReport.from_json(out).alphas) == {f"encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)}


def test_cli_missing_model_offline_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["analyze", "nobody/no-such-model", "--no-progress"]) == 1  # a run that failed
    err = capsys.readouterr().err
    assert "'nobody/no-such-model'" in err and "not a local directory" in err and "HF_HUB_OFFLINE" in err


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    exe = shutil.which("opentrans-hf") or os.path.join(os.path.dirname(sys.executable), "opentrans-hf")
    res = subprocess.run([exe, "analyze", "tiny", "--out", str(tmp_path / "r.json"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["estimator"] == "opentrans"
