"""Fault probes of issue 24, class 8 (errors that come late or name nothing), as a user meets them on the
command line: every bad argument is refused before any model or data loads, with exit status 2 and one
line naming the flag and the value -- ranges, holdout class names, an --output_dir that is a file, an
--out that is a directory, a mask adapter given where a model is expected."""

import json
import os

import pytest
import torch

from opentrans_hf.cli import main


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any job that gets as far as looking up its CLIP or loading a model fails the test."""
    from opentrans_hf.commands import demo, evaluate, predict, prune, reproduce
    from opentrans_hf.training import trainer

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in (demo, prune, reproduce, trainer):
        monkeypatch.setattr(module, "default_clip", loaded)
    for module in (evaluate, predict):
        monkeypatch.setattr(module, "load_or_explain", loaded)


def _refused(argv, capsys, *words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    for raw in ("Errno", "Traceback", "KeyError"):
        assert raw not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["prune", "--rate", "1.5"], ["--rate", "1.5"]),
    (["prune", "--rate", "0"], ["--rate", "0"]),
    (["prune", "--num_rounds", "0"], ["--num_rounds", "0"]),
    (["prune", "--learning_rate", "nan"], ["--learning_rate", "nan"]),
    (["prune", "--learning_rate=-1e-5"], ["--learning_rate", "-1e-05"]),
    (["prune", "--steps_per_round=-1"], ["--steps_per_round", "-1"]),
    (["prune", "--target_sparsity", "1.5"], ["--target_sparsity", "1.5"]),
    (["prune", "--scope", "2:4", "--num_rounds", "3"], ["2:4", "num_rounds"]),
    (["train", "--learning_rate", "nan"], ["learning_rate", "nan"]),
    (["train", "--learning_rate", "inf"], ["learning_rate", "inf"]),
    (["train", "--backbone_lr_multiplier", "inf"], ["--backbone_lr_multiplier", "inf"]),
    (["train", "--weight_decay", "inf"], ["--weight_decay", "inf"]),
    (["reproduce", "--learning_rate", "inf"], ["--learning_rate", "inf"]),
    (["reproduce", "--prune_learning_rate", "nan"], ["--prune_learning_rate", "nan"]),
    (["train", "--image_size", "0"], ["--image_size", "0"]),
    (["train", "--embedded_size", "0"], ["--embedded_size", "0"]),
    (["demo", "--prune_rate", "1.5"], ["--prune_rate", "1.5"]),
    (["demo", "--target_sparsity", "1.5"], ["--target_sparsity", "1.5"]),
    (["demo", "--learning_rate", "nan"], ["--learning_rate", "nan"]),
    (["demo", "--prune_steps_per_round=-1"], ["--prune_steps_per_round", "-1"]),
    (["demo", "--max_eval_examples", "0"], ["--max_eval_examples", "0"]),
    (["evaluate", "--model", "m", "--image_size", "0"], ["--image_size", "0"]),
])
def test_range_errors_exit_2_before_anything_loads(argv, words, nothing_loads, capsys, tmp_path):
    _refused([*argv, "--output_dir", str(tmp_path / "out")] if argv[0] != "evaluate" else argv, capsys, *words)


@pytest.mark.parametrize("job", ["demo", "train"])
def test_holdout_class_outside_the_vocabulary_is_refused_before_the_long_stages(job, nothing_loads, capsys, tmp_path):
    line = _refused([job, "--holdout_classes", "lava", "--output_dir", str(tmp_path / "out")], capsys,
                    "--holdout_classes", "'lava'")
    assert "sky" in line  # the vocabulary it is not in is named
    assert not (tmp_path / "out").exists()


def test_holdout_class_of_a_named_vocabulary_is_checked_against_it(nothing_loads, capsys, tmp_path):
    _refused(["train", "--dataset", str(tmp_path), "--class_names", "cat", "dog", "--holdout_classes", "cow",
              "--output_dir", str(tmp_path / "out")], capsys, "--holdout_classes", "'cow'", "dog")


@pytest.mark.parametrize("argv", [
    ["train"], ["prune"], ["demo"], ["reproduce"], ["pretrain-clip"],
    ["predict", "--model", "m", "--classes", "a,b", "IMAGE"],
])
def test_output_dir_that_is_a_file_is_refused(argv, nothing_loads, capsys, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _refused([*argv, "--output_dir", str(afile)], capsys, "--output_dir", str(afile), "not a directory")
    _refused([*argv, "--output_dir", str(afile / "sub")], capsys, "--output_dir", str(afile), "not a directory")
    assert afile.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_dir_that_cannot_be_written_is_refused_naming_it(nothing_loads, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        _refused(["train", "--output_dir", str(locked / "run")], capsys, "--output_dir", str(locked), "not writable")
    finally:
        locked.chmod(0o700)


def test_evaluate_out_that_is_a_directory_is_refused_before_the_evaluation(nothing_loads, capsys, tmp_path):
    _refused(["evaluate", "--model", "m", "--out", str(tmp_path)], capsys, "--out", str(tmp_path), "directory")
    _refused(["evaluate", "--model", "m", "--out", str(tmp_path / "results.md")], capsys, "--out", "results.md")


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_analyze_out_that_is_a_directory_is_refused(flag, capsys, tmp_path):
    _refused(["analyze", "tiny", flag, str(tmp_path)], capsys, flag, str(tmp_path), "directory")


@pytest.fixture(scope="module")
def mask_adapter_dir(tmp_path_factory):
    from opentrans_hf.methods.sparse_mask.mask import SparseMask

    d = tmp_path_factory.mktemp("mask") / "mask"
    SparseMask({"encoder.layers.0.mlp.fc1.weight": torch.rand(8, 4) > 0.5}).save_pretrained(d)
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "SPARSE_MASK"
    return d


@pytest.mark.parametrize("argv", [
    ["evaluate", "--model", "MASK"],
    ["predict", "--model", "MASK", "--classes", "a,b", "--output_dir", "OUT", "IMAGE"],
    ["analyze", "MASK"],
    ["train", "--model_name_or_path", "MASK", "--output_dir", "OUT"],
    ["prune", "--model_name_or_path", "MASK", "--output_dir", "OUT"],
    ["demo", "--model_name_or_path", "MASK", "--output_dir", "OUT"],
])
def test_mask_adapter_given_as_the_model_says_pass_it_as_mask(argv, mask_adapter_dir, nothing_loads, capsys, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    subst = {"MASK": str(mask_adapter_dir), "OUT": str(tmp_path / "out"), "IMAGE": str(image)}
    _refused([subst.get(a, a) for a in argv], capsys, str(mask_adapter_dir), "mask adapter", "SPARSE_MASK", "--mask")



@pytest.mark.parametrize("probe", ["lacks a tensor", "prune --push_to_hub offline"])
def test_an_adapter_or_a_push_that_cannot_work_is_refused_before_loading(probe, nothing_loads, tiny_clip_dir,
                                                                          tmp_path, capsys, monkeypatch):
    """`train --spectral_config <adapter>` whose file lacks a tensor its config lists, and `prune --push_to_hub`
    with HF_HUB_OFFLINE set: exit 2 at the arguments, naming the flag, before anything loads."""
    from safetensors.torch import load_file, save_file

    from opentrans_hf import CLIPDeepLabV3ForOVS, SpectralTuningConfig, get_spectral_model

    if probe == "lacks a tensor":
        model = CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=30, seen_class_names=["sky", "grass"])
        spectral = get_spectral_model(model, SpectralTuningConfig(freeze_rule="median",
                                                                  target_modules=model.encoder_target_modules()))
        spectral.save_pretrained(tmp_path / "adapter")
        weights = tmp_path / "adapter" / "adapter_model.safetensors"
        save_file(dict(list(load_file(str(weights)).items())[1:]), str(weights))
        capsys.readouterr()  # the setup's own output
        _refused(["train", "--output_dir", str(tmp_path / "run"), "--spectral_config", str(tmp_path / "adapter")],
                 capsys, "--spectral_config", "adapter_model.safetensors", "lacks 1 tensor")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        _refused(["prune", "--output_dir", str(tmp_path / "run"), "--push_to_hub", "--hub_model_id", "me/mask"],
                 capsys, "--push_to_hub", "HF_HUB_OFFLINE")
    assert not (tmp_path / "run").exists()
