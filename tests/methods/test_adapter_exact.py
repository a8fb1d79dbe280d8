"""Issue 24, class 2: spectral adapters load exactly. Every tensor the config says was trained (the analysed
layers it trained, modules_to_save, a framework's head: all listed in adapter_config.json) must be in the
file, and nothing else; the error names the file and the tensors; nothing is changed. The same holds for a
directory given to ``train --spectral_config``."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from opentrans_hf import SpectralModel, SpectralTuningConfig, get_spectral_model
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.models import CLIPDeepLabV3ForOVS

HEAD = "aspp.branches.0.0.weight"
HEAD_KEY = "base_model.model.aspp.branches.0.0.ln_tuning_layers.weight"


def framework(tiny_clip_dir):
    return CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, image_size=30, seen_class_names=["sky", "grass"])


@pytest.fixture
def run_adapter(tiny_clip_dir, tmp_path):
    """An adapter shaped as the train job's ``model/spectral_adapter`` (the framework, ``--freeze_rule
    median`` on its encoder targets, the head trained), "trained" so loaded values show."""
    model = framework(tiny_clip_dir)
    spectral = get_spectral_model(model, SpectralTuningConfig(freeze_rule="median",
                                                              target_modules=model.encoder_target_modules()))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    d = spectral.save_pretrained(tmp_path / "spectral_adapter")
    return d, {n: t.clone() for n, t in load_file(str(d / "adapter_model.safetensors")).items()}


def load_refused(tiny_clip_dir, d, pattern):
    """``SpectralModel.from_pretrained`` refuses ``d`` with ``pattern`` and changes nothing of the model."""
    base = framework(tiny_clip_dir)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=pattern):
        SpectralModel.from_pretrained(base, d)
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n


def test_a_head_tensor_deleted_from_the_file_is_refused(run_adapter, tiny_clip_dir):
    d, tensors = run_adapter
    assert HEAD_KEY in tensors  # the head is in the adapter (PEFT LN_TUNING's key for its layer)
    save_file({k: t for k, t in tensors.items() if k != HEAD_KEY}, str(d / "adapter_model.safetensors"))
    load_refused(tiny_clip_dir, d, re.escape(str(d / "adapter_model.safetensors")) + r" does not hold exactly the tensors "
                 r"adapter_config\.json lists as trained: it lacks 1 tensor\(s\) \(" + re.escape(HEAD) + r"\)")


def test_a_head_tensor_deleted_from_the_file_and_the_config_is_refused(run_adapter, tiny_clip_dir):
    """The config still trains the head's layer (it is a target module): its whole state must be there."""
    d, tensors = run_adapter
    norm, key = "aspp.branches.0.1.weight", "base_model.model.aspp.branches.0.1.ln_tuning_layers.weight"
    data = json.loads((d / "adapter_config.json").read_text())
    data["spectral_tuning"]["tensors"].remove(norm)
    (d / "adapter_config.json").write_text(json.dumps(data))
    save_file({k: t for k, t in tensors.items() if k != key}, str(d / "adapter_model.safetensors"))
    load_refused(tiny_clip_dir, d, re.escape(str(d / "adapter_model.safetensors")) + r" does not hold the whole state "
                 r"of target module aspp\.branches\.0\.1: it lacks 1 tensor\(s\) \(" + re.escape(norm) + r"\)")
    # the head's convolution has a weight only: without it, its target module holds nothing
    data["spectral_tuning"]["tensors"].remove(HEAD)
    (d / "adapter_config.json").write_text(json.dumps(data))
    save_file({k: t for k, t in tensors.items() if k not in (key, HEAD_KEY)}, str(d / "adapter_model.safetensors"))
    load_refused(tiny_clip_dir, d, re.escape(str(d / "adapter_config.json")) + r": target_modules \['aspp\.branches\.0\.0'\] "
                 r"have no tensor in spectral_tuning\.tensors")


def test_an_analysed_layer_the_config_trains_must_be_there(run_adapter, tiny_clip_dir):
    d, tensors = run_adapter
    data = json.loads((d / "adapter_config.json").read_text())
    layer = data["spectral_tuning"]["config"]["trainable_layers"][0]
    host = "clip.vision_model." + layer
    data["target_modules"].remove(host)  # the config edited consistently: only trainable_layers still says so
    data["spectral_tuning"]["tensors"] = [n for n in data["spectral_tuning"]["tensors"] if not n.startswith(host + ".")]
    (d / "adapter_config.json").write_text(json.dumps(data))
    save_file({k: t for k, t in tensors.items() if f".{layer}." not in k}, str(d / "adapter_model.safetensors"))
    load_refused(tiny_clip_dir, d, r"lacks 2 tensor\(s\) \(" + re.escape(host) + r"\.bias, " + re.escape(host)
                 + r"\.weight\) that adapter_config\.json says were trained")


@pytest.mark.parametrize("key", ["base_model.model.clip.text_model.final_layer_norm.weight",
                                 "base_model.model.aspp.branches.0.0.ln_tuning_layers.bias",
                                 "clip.text_model.final_layer_norm.weight"])
def test_an_extra_tensor_is_refused(run_adapter, tiny_clip_dir, key):
    d, tensors = run_adapter
    save_file({**tensors, key: torch.zeros(16)}, str(d / "adapter_model.safetensors"))
    load_refused(tiny_clip_dir, d, re.escape(str(d / "adapter_model.safetensors")) + r" does not hold exactly .*it holds "
                 r"1 tensor\(s\) \(" + re.escape(key) + r"\) that the config does not list")


def test_an_extra_tensor_listed_in_the_config_too_is_refused_when_frozen_by_it(run_adapter, tiny_clip_dir):
    """Listing a frozen analysed layer's weight as trained contradicts the spectral config."""
    d, tensors = run_adapter
    data = json.loads((d / "adapter_config.json").read_text())
    cfg = data["spectral_tuning"]["config"]
    frozen = "clip.vision_model." + next(n for n in cfg["layer_alphas"] if n not in cfg["trainable_layers"])
    data["spectral_tuning"]["tensors"].append(f"{frozen}.weight")
    (d / "adapter_config.json").write_text(json.dumps(data))
    weight = framework(tiny_clip_dir).get_submodule(frozen).weight.detach().clone()
    save_file({**tensors, f"base_model.model.{frozen}.weight": weight}, str(d / "adapter_model.safetensors"))
    load_refused(tiny_clip_dir, d, r"holds 1 tensor\(s\) \(" + re.escape(frozen) + r"\.weight\) of layers that "
                 r"adapter_config\.json says were frozen")


def test_the_intact_adapter_loads_every_tensor(run_adapter, tiny_clip_dir):
    d, tensors = run_adapter
    base = framework(tiny_clip_dir)
    SpectralModel.from_pretrained(base, d)
    assert torch.equal(base.get_submodule("aspp.branches.0.0").weight, tensors[HEAD_KEY])


def train_with(tiny_clip_dir, out, spectral_config):
    return run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
        "--embedded_size", "16", "--max_eval_examples", "4", "--max_steps", "1", "--spectral_config", str(spectral_config)]))


@pytest.mark.parametrize("probe", ["deleted", "extra"])
def test_train_refuses_such_an_adapter_as_spectral_config(run_adapter, tiny_clip_dir, tmp_path, probe):
    d, tensors = run_adapter
    if probe == "deleted":
        bad, pattern = {k: t for k, t in tensors.items() if k != HEAD_KEY}, r"it lacks 1 tensor\(s\) \(" + re.escape(HEAD)
    else:
        key = "base_model.model.clip.text_model.final_layer_norm.weight"
        bad, pattern = {**tensors, key: torch.zeros(16)}, r"it holds 1 tensor\(s\) \(" + re.escape(key)
    save_file(bad, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(str(d / "adapter_model.safetensors")) + " does not hold exactly .*" + pattern):
        train_with(tiny_clip_dir, tmp_path / "run", d)
    assert not (tmp_path / "run" / "model").exists()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))  # the intact adapter's config is taken
    assert SpectralTuningConfig.from_pretrained(d).trainable_layers
