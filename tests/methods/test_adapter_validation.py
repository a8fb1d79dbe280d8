"""Adapters and configs read from disk are validated: every error names the file, the field or tensor,
and the value; nothing is applied half-way. Also: an eigensolver failure marks one layer invalid."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from opentrans_hf import (
    SparseMask,
    SpectralModel,
    SpectralTuningConfig,
    analyze_spectra,
    get_spectral_model,
    magnitude_prune,
)
from opentrans_hf.methods.spectral_tuning.peft_format import AdapterLayout
from opentrans_hf.spectral import analyze as analyze_mod

VISION = r"encoder\.layers\.\d+\..*"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture
def vision(tiny_clip_dir):
    return CLIPVisionModel.from_pretrained(tiny_clip_dir)


# ---- SpectralTuningConfig -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, pattern", [
    ({"train_norms": "yes"}, r"train_norms must be a bool .*got 'yes' \(str\)"),
    ({"train_biases": 1}, r"train_biases must be a bool .*got 1 \(int\)"),
    ({"inference_mode": None}, r"inference_mode must be a bool"),
    ({"freeze_rule": "ratio", "freeze_ratio": "0.5"}, r"freeze_ratio must be a number in \[0, 1\], got '0.5' \(str\)"),
    ({"freeze_rule": "ratio", "freeze_ratio": float("nan")}, r"freeze_ratio must be in \[0, 1\], got nan"),
    ({"freeze_rule": "ratio", "freeze_ratio": True}, r"freeze_ratio must be a number"),
    ({"freeze_rule": "threshold", "alpha_threshold": float("inf")}, r"alpha_threshold must be a finite number"),
    ({"freeze_rule": "top_k", "k": 2.5}, r"k must be an integer or None, got 2.5"),
    ({"target_modules": 5}, r"target_modules must be a regex string, a list of module names or None, got 5"),
    ({"target_modules": "encoder.("}, r"SpectralTuningConfig.target_modules: invalid regular expression 'encoder.\('"),
    ({"exclude_modules": ["fc1", 3]}, r"SpectralTuningConfig.exclude_modules: module patterns must be strings, got 3"),
    ({"modules_to_save": "head"}, r"modules_to_save must be a list of module names or None \(did you mean \['head'\]\?\)"),
    ({"layer_alphas": {"a": 3.0, "b": float("nan")}}, r"layer_alphas must map layer names to finite numbers > 0; 1 entry is not: 'b': nan"),
    ({"layer_alphas": {"a": 3.0, "b": -1.0}}, r"layer_alphas must map layer names to finite numbers > 0; 1 entry is not: 'b': -1.0"),
    ({"layer_alphas": {"a": True}}, r"'a': True"),
    ({"layer_alphas": [3.0]}, r"layer_alphas must be a mapping"),
    ({"layer_alphas": {"fc": 3.0}, "trainable_layers": ["fc", "head"]},
     r"trainable_layers names 1 layer\(s\) that layer_alphas does not have, e.g. \['head'\]"),
    ({"trainable_layers": "fc"}, r"trainable_layers must be a list of module names"),
    ({"base_model_name_or_path": 3}, r"base_model_name_or_path must be a string or None, got 3"),
])
def test_config_fields_are_validated(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SpectralTuningConfig(**kwargs)


def test_fused_qkv_parts_count_as_their_module():
    cfg = SpectralTuningConfig(layer_alphas={"attn.qkv_q": 3.0, "attn.qkv_k": 4.0, "attn.qkv_v": 5.0},
                               trainable_layers=["attn.qkv"])
    assert cfg.trainable_layers == ["attn.qkv"]


@pytest.mark.parametrize("field, value, pattern", [
    ("train_norms", "yes", r"train_norms must be a bool \(true or false\), got 'yes'"),
    ("layer_alphas", {"encoder.layers.0.mlp.fc1": float("nan")}, r"'encoder.layers.0.mlp.fc1': nan"),
    ("freeze_ratio", "high", r"freeze_ratio must be a number in \[0, 1\], got 'high'"),
    ("rank", 8, r"unknown SpectralTuningConfig field\(s\) \['rank'\]"),
])
def test_config_file_errors_name_the_file(tmp_path, field, value, pattern):
    data = SpectralTuningConfig(target_modules=VISION).to_dict()
    data[field] = value
    (tmp_path / CONFIG).write_text(json.dumps(data))  # json writes NaN as NaN, which json.loads reads back
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG)) + ": .*" + pattern):
        SpectralTuningConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        SpectralTuningConfig.from_pretrained(tmp_path / CONFIG)


# ---- SpectralModel.from_pretrained: the adapter file against its config ------------------------------

@pytest.fixture
def spectral_adapter(tmp_path, vision):
    """(directory, tensors by their names in the model, the SpectralTuningConfig dict)."""
    model = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION))
    d = model.save_pretrained(tmp_path / "adapter")
    data = json.loads((d / CONFIG).read_text())
    layout = AdapterLayout(tuple(data["target_modules"]), tuple(data["spectral_tuning"]["tensors"]))
    tensors = {n: t.clone() for n, t in layout.to_model_names(load_file(str(d / WEIGHTS)), d).items()}
    return d, tensors, data["spectral_tuning"]["config"]


def _load_with(tiny_clip_dir, d, tensors):
    """Rewrite the adapter with ``tensors`` (by model names), the file and the config's list of tensors
    changed together: what is checked is the adapter against what the config says was trained."""
    data = json.loads((d / CONFIG).read_text())
    owners = {n.rpartition(".")[0] for n in tensors}
    layout = AdapterLayout(tuple(t for t in data["target_modules"] if t in owners), tuple(tensors))
    data["target_modules"], data["spectral_tuning"]["tensors"] = list(layout.targets), list(layout.tensors)
    (d / CONFIG).write_text(json.dumps(data))
    save_file({layout.file_key(n): t for n, t in tensors.items()}, str(d / WEIGHTS))
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    try:
        return SpectralModel.from_pretrained(base, d)
    except ValueError:  # a refused adapter changes nothing
        for n, p in base.named_parameters():
            assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
        raise


def test_adapter_missing_trained_tensors(tiny_clip_dir, spectral_adapter):
    d, tensors, cfg = spectral_adapter
    trained = {f"{m}.{p}" for m in cfg["trainable_layers"] for p in ("weight", "bias")}
    assert trained <= set(tensors)
    kept = {n: t for n, t in tensors.items() if n not in trained}  # e.g. embeddings and norms only
    with pytest.raises(ValueError, match=re.escape(str(d / WEIGHTS)) + f" lacks {len(trained)} tensor\\(s\\) \\(.*, \\.\\.\\.\\) "
                                         "that adapter_config.json says were trained"):
        _load_with(tiny_clip_dir, d, kept)
    one = sorted(trained)[0]
    with pytest.raises(ValueError, match=f"lacks 1 tensor\\(s\\) \\({re.escape(one)}\\)"):
        _load_with(tiny_clip_dir, d, {n: t for n, t in tensors.items() if n != one})


def test_adapter_tensor_of_a_frozen_layer(tiny_clip_dir, spectral_adapter, vision):
    d, tensors, cfg = spectral_adapter
    frozen = [m for m in cfg["layer_alphas"] if m not in cfg["trainable_layers"]][0]
    extra = dict(tensors, **{f"{frozen}.weight": vision.get_submodule(frozen).weight.detach().clone()})
    with pytest.raises(ValueError, match=f"holds 1 tensor\\(s\\) \\({re.escape(frozen)}.weight\\) of layers that "
                                         "adapter_config.json says were frozen"):
        _load_with(tiny_clip_dir, d, extra)


def test_adapter_values_dtypes_and_shapes(tiny_clip_dir, spectral_adapter):
    d, tensors, cfg = spectral_adapter
    name = f"{cfg['trainable_layers'][0]}.weight"
    nan = tensors[name].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape(str(d / WEIGHTS)) + f": 1 tensor\\(s\\) \\({re.escape(name)}\\) hold NaN or Inf"):
        _load_with(tiny_clip_dir, d, dict(tensors, **{name: nan}))
    with pytest.raises(ValueError, match=f"{re.escape(name)} torch.int64\\) are not floating point"):
        _load_with(tiny_clip_dir, d, dict(tensors, **{name: tensors[name].long()}))
    with pytest.raises(ValueError, match=f"{re.escape(name)} \\(3, 3\\) vs \\(.*\\)\\) have a shape other than the model's"):
        _load_with(tiny_clip_dir, d, dict(tensors, **{name: torch.zeros(3, 3)}))
    assert _load_with(tiny_clip_dir, d, tensors).trainable_layers == cfg["trainable_layers"]  # the intact file loads


def test_truncated_adapter_files_name_the_file(tmp_path, tiny_clip_dir, spectral_adapter, vision):
    d, _, _ = spectral_adapter
    m = magnitude_prune(vision, 0.5).save_pretrained(tmp_path / "mask")
    for path, load in ((d / WEIGHTS, lambda: SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d)),
                       (m / WEIGHTS, lambda: SparseMask.from_pretrained(m))):
        data = path.read_bytes()
        for cut in (len(data) // 2, len(data) - 1, 4, 0):
            path.write_bytes(data[:cut])
            with pytest.raises(ValueError, match=f"cannot read {re.escape(str(path))} .*not a complete safetensors file"):
                load()
        path.unlink()
        with pytest.raises(FileNotFoundError, match=WEIGHTS):
            load()


def test_save_records_layers_frozen_after_the_rule(tmp_path, tiny_clip_dir, vision):
    model = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION))
    gone = model.trainable_layers[-1]
    vision.get_submodule(gone).requires_grad_(False)  # e.g. freeze_unused_parameters after get_spectral_model
    d = model.save_pretrained(tmp_path / "a")
    saved = json.loads((d / CONFIG).read_text())["spectral_tuning"]["config"]["trainable_layers"]
    assert saved == model.trainable_layers[:-1]
    loaded = SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d, is_trainable=True)
    assert loaded.trainable_layers == saved
    vision.get_submodule(model.trainable_layers[0]).weight.requires_grad_(False)  # half a layer: not expressible
    frozen = model.frozen_layers[0]
    vision.get_submodule(frozen).weight.requires_grad_(True)
    with pytest.raises(ValueError, match=f"1 tensor\\(s\\) \\({re.escape(model.trainable_layers[0])}.weight\\) frozen although "
                                         f".*1 tensor\\(s\\) \\({re.escape(frozen)}.weight\\) trainable although"):
        model.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---- SparseMask adapter_config.json ---------------------------------------------------------------

@pytest.fixture
def mask_dir(tmp_path, vision):
    d = magnitude_prune(vision, 0.5).save_pretrained(tmp_path / "mask")
    return d, json.loads((d / CONFIG).read_text())


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.update(target_sparsity="high"), r"field 'target_sparsity' must be a number in \[0, 1\] or null, got 'high' \(str\)"),
    (lambda c: c.update(target_sparsity=1.5), r"'target_sparsity' must be a number in \[0, 1\] or null, got 1.5"),
    (lambda c: c.update(sparsity="0.5"), r"field 'sparsity' must be a number in \[0, 1\], got '0.5'"),
    (lambda c: c.update(shapes=dict(c["shapes"], **{"encoder.layers.0.mlp.fc1.weight": ["37", 32]})),
     r"'shapes' entry 'encoder.layers.0.mlp.fc1.weight' must be a list of positive integers, got \['37', 32\]"),
    (lambda c: c.update(shapes=dict(c["shapes"], **{"encoder.layers.0.mlp.fc1.weight": [37, 33]})),
     r"'num_weights' is \d+ but the shapes hold \d+ weights"),
    (lambda c: c.update(num_weights=c["num_weights"] + 1), r"'num_weights' is \d+ but"),
    (lambda c: c.update(shapes=dict(c["shapes"], **{"encoder.layers.0.mlp.fc1.weight": [37, 33]}), num_weights=None),
     r"entry 'encoder.layers.0.mlp.fc1.weight' holds 148 torch.uint8 values; expected 153 uint8 bytes for shape \(37, 33\)"),
    (lambda c: c.update(method=3), r"SparseMask method must be a string, got 3 \(int\)"),
    (lambda c: c.update(extra=[1]), r"SparseMask extra must be a dict or None"),
    (lambda c: c.update(rank=8), r"unknown field\(s\) \['rank'\]"),
    (lambda c: c["layer_densities"].update({"encoder.layers.0.mlp.fc1.weight": 0.9}),
     r"1 mask\(s\) differ from the layer_densities .*encoder.layers.0.mlp.fc1.weight: recorded 0.9"),
    (lambda c: c["layer_densities"].pop("encoder.layers.0.mlp.fc1.weight"), r"'layer_densities' must have one entry per mask"),
])
def test_mask_config_fields_are_validated(mask_dir, edit, pattern):
    d, cfg = mask_dir
    edit(cfg)
    (d / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=pattern) as err:
        SparseMask.from_pretrained(d)
    assert str(d) in str(err.value)


def test_mask_constructor_checks_its_fields():
    m = {"fc.weight": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"SparseMask target_sparsity must be a number in \[0, 1\] or None, got 'high' \(str\)"):
        SparseMask(m, target_sparsity="high")
    with pytest.raises(ValueError, match="target_sparsity .* got nan"):
        SparseMask(m, target_sparsity=float("nan"))
    assert SparseMask(m, target_sparsity=0.5).target_sparsity == 0.5


# ---- analysis: an eigensolver that fails on one layer --------------------------------------------

BROKEN = "encoder.layers.0.mlp.fc1"


def _fails_on(vision, routine, to_array, error=np.linalg.LinAlgError):
    """Wrap ``routine`` so that it raises ``error`` whenever its input holds BROKEN's weight."""
    target = vision.get_submodule(BROKEN).weight.detach().float()

    def wrapped(mats, *args, **kwargs):
        if any(np.array_equal(to_array(m), target.numpy()) for m in mats):
            raise error("Eigenvalues did not converge")
        return routine(mats, *args, **kwargs)

    return wrapped


def _check_report(report, reference):
    broken = report[BROKEN]
    assert broken.status == "invalid" and broken.alpha is None
    assert "eigensolver failed (LinAlgError: Eigenvalues did not converge)" in broken.warning
    others = {n: a for n, a in reference.alphas.items() if n != BROKEN}
    assert report.alphas.keys() == others.keys()
    for n, a in others.items():
        assert report[n].alpha == pytest.approx(a, rel=1e-3)


def test_eigensolver_failure_marks_one_layer_invalid(vision, monkeypatch):
    reference = analyze_spectra(vision, precision="float32")
    monkeypatch.setattr(analyze_mod, "numpy_eigenvalues",
                        _fails_on(vision, analyze_mod.numpy_eigenvalues, lambda m: m.astype(np.float32)))
    report = analyze_spectra(vision, precision="float32")
    _check_report(report, reference)
    assert "precision='float64' may converge" in report[BROKEN].warning
    line = next(l for l in report.summary().splitlines() if l.startswith(BROKEN + " "))
    assert "invalid (eigensolver failed (LinAlgError: Eigenvalues did not converge)" in line


def test_eigensolver_failure_in_a_batch_spares_the_other_layers(vision, monkeypatch):
    monkeypatch.setattr(analyze_mod, "CPU_THREAD_ENGINE", False)  # the batched path accelerators take
    reference = analyze_spectra(vision)
    monkeypatch.setattr(analyze_mod, "matrix_eigenvalues",
                        _fails_on(vision, analyze_mod.matrix_eigenvalues, lambda m: m.float().numpy(), torch.linalg.LinAlgError))
    _check_report(analyze_spectra(vision), reference)


def test_cli_analyze_reports_the_failing_layer(monkeypatch, tmp_path, capsys, tiny_clip_dir, vision):
    from opentrans_hf.cli import main

    monkeypatch.setattr(analyze_mod, "numpy_eigenvalues",
                        _fails_on(vision, analyze_mod.numpy_eigenvalues, lambda m: m.astype(np.float32)))
    out = tmp_path / "report.json"
    assert main(["analyze", str(tiny_clip_dir), "--precision", "float32", "--out", str(out)]) == 0
    assert re.search(rf"{re.escape(BROKEN)} .* invalid \(eigensolver failed \(LinAlgError: Eigenvalues did not converge\)",
                     capsys.readouterr().out)
    layers = {l["name"]: l for l in json.loads(out.read_text())["layers"]}
    assert layers[BROKEN]["status"] == "invalid" and "did not converge" in layers[BROKEN]["warning"]
    assert sum(l["status"] == "ok" for l in layers.values()) == len(layers) - 1
