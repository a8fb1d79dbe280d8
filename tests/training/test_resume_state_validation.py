"""Reports that accept anything (issue 24, class 6), the run state read on resume: a checkpoint's
``history.json`` is checked before a resumed run appends to it (steps, losses and learning rates typed, finite,
as many of each; evaluation points with mIoU in [0, 1]); an error names the file and the value."""

from __future__ import annotations

import json
import shutil

import pytest

from opentrans_hf.cli import main as cli_main
from opentrans_hf.training.checkpoints import read_history


def train_argv(tiny_clip_dir, out, *extra):
    return ["train", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
            "--embedded_size", "8", "--max_eval_examples", "2", "--learning_rate", "1e-3", *extra]


GOOD = {"step": [1, 2, 3], "loss": [2.5, 2.4, 2.3], "lr": [1e-3, 9e-4, 8e-4],
        "eval": [{"step": 2, "embedded:validation": 0.25, "embedded:validation seen": 0.3}]}


def write(tmp_path, history, allow_nan=True):
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history, allow_nan=allow_nan))
    return path


def test_a_good_history_reads_back(tmp_path):
    assert read_history(write(tmp_path, GOOD), 3) == GOOD
    nan_miou = {**GOOD, "eval": [{"step": 2, "embedded:validation": float("nan")}]}  # undefined mIoU: as written
    assert read_history(write(tmp_path, nan_miou), 3)["eval"][0]["step"] == 2
    no_lr = {k: v for k, v in GOOD.items() if k != "lr"}
    assert read_history(write(tmp_path, no_lr), 3)["lr"] == []
    switch = {**GOOD, "spectral_switch": {"step": 2, "freeze_rule": "median"}}
    assert read_history(write(tmp_path, switch), 3)["spectral_switch"]["step"] == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"loss": [2.5, float("nan"), 2.3]}, r"'loss' must hold finite numbers, got nan"),
    ({"loss": [2.5, "big", 2.3]}, r"'loss' must hold finite numbers, got 'big'"),
    ({"loss": [2.5, 2.4]}, r"2 'loss' value\(s\) for 3 steps"),
    ({"lr": [1e-3, -1.0, 8e-4]}, r"'lr' must hold finite numbers >= 0, got -1\.0"),
    ({"step": [1, 3, 2]}, r"'step' must list increasing optimizer steps from 1 to the checkpoint's 3"),
    ({"step": [1, 2, 7]}, r"'step' must list increasing .* got 7"),
    ({"step": [1, 2, 3.0]}, r"got 3\.0"),
    ({"step": "1-3"}, r"'step' must be a list, got '1-3'"),
    ({"eval": [{"embedded:validation": 0.3}]}, r"an 'eval' point must be \{\"step\": N <= 3"),
    ({"eval": [{"step": 2, "embedded:validation": 25.0}]},
     r"the 'eval' point of step 2 has 'embedded:validation': 25\.0; an mIoU is in \[0, 1\]"),
    ({"spectral_switch": {"freeze_rule": "median"}}, r"'spectral_switch' must be the switch's record"),
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
])
def test_a_bad_history_names_the_file_and_the_value(tmp_path, changes, message):
    path = write(tmp_path, {**GOOD, **changes})
    with pytest.raises(ValueError, match=message) as err:
        read_history(path, 3)
    assert str(err.value).startswith(f"training history {path}: ")


def test_missing_keys_and_other_json(tmp_path):
    with pytest.raises(ValueError, match=r"missing key\(s\) \['loss'\]"):
        read_history(write(tmp_path, {"step": [], "eval": []}), 3)
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_history(write(tmp_path, [1, 2]), 3)
    (tmp_path / "history.json").write_text("{")
    with pytest.raises(ValueError, match="history.json is not valid JSON"):
        read_history(tmp_path / "history.json", 3)


def test_resume_refuses_a_checkpoint_whose_history_was_tampered_with(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(tiny_clip_dir, out, "--max_steps", "2", "--checkpointing_steps", "1")
    assert cli_main(argv) == 0
    shutil.rmtree(out / "step_2")
    shutil.rmtree(out / "model")
    hist = out / "step_1" / "history.json"
    history = json.loads(hist.read_text())
    assert history["step"] == [1]  # what the checkpoint recorded
    history["loss"] = [float("nan")]
    hist.write_text(json.dumps(history))
    capsys.readouterr()
    assert cli_main([*argv, "--resume_from_checkpoint", "latest"]) == 1
    err = capsys.readouterr().err
    assert f"training history {hist}: 'loss' must hold finite numbers, got nan" in err
    assert not (out / "model").exists()
