"""Fault probes of issue 24, class 1 (runs mixed in one directory): an output directory belongs to one run.
A job refuses a directory holding another run's outputs (exit status 2, before anything loads, naming the
directory, what is there and the ways out), unless it resumes that run, or is given
--overwrite_output_dir, which removes the earlier run's outputs first -- only what the job writes there:
a user's own files stay."""

import json

import numpy as np
import pytest
from PIL import Image

from opentrans_hf.cli import main
from opentrans_hf.training.outputs import TRAIN_LAYOUT, OutputDirInUse, OutputLayout, claim_output_dir
from opentrans_hf.utils.locking import LOCK_NAME, output_dir_lock


def _exit_and_error(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_train_after_a_finished_run_is_refused_and_overwrite_removes_that_runs_outputs(tiny_clip_dir, tmp_path,
                                                                                      capsys):
    out = tmp_path / "run"
    base = ["train", "--model_name_or_path", str(tiny_clip_dir), "--batch_size", "4", "--embedded_size", "8",
            "--max_eval_examples", "2", "--output_dir", str(out)]
    assert main([*base, "--max_steps", "2", "--checkpointing_steps", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    first_metrics = (out / "metrics.json").read_bytes()
    first_model = (out / "model" / "model.safetensors").read_bytes()

    # the probe: another run, other arguments, no resume -> refused, nothing of the first run touched
    code, err = _exit_and_error([*base, "--max_steps", "1", "--learning_rate", "0.01"], capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    for word in (str(out), "metrics.json", "--resume_from_checkpoint latest", "--overwrite_output_dir"):
        assert word in line, (word, line)
    assert (out / "metrics.json").read_bytes() == first_metrics
    assert (out / "model" / "model.safetensors").read_bytes() == first_model
    assert (out / "step_1").is_dir() and (out / "step_2").is_dir()

    # resuming the run is its own: allowed (the checkpoint's fingerprint decides)
    code, err = _exit_and_error([*base, "--max_steps", "2", "--checkpointing_steps", "1",
                                 "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err

    # --overwrite_output_dir: the first run's outputs (its step checkpoints too) are gone, the user's file stays
    assert main([*base, "--max_steps", "1", "--overwrite_output_dir"]) == 0
    assert not (out / "step_1").exists() and not (out / "step_2").exists()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / LOCK_NAME).exists()


def test_train_refuses_overwrite_together_with_resuming_its_own_checkpoint(tmp_path, capsys):
    code, err = _exit_and_error(["train", "--output_dir", str(tmp_path), "--overwrite_output_dir",
                                 "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and "--overwrite_output_dir" in err and "--resume_from_checkpoint" in err


def test_prune_resumes_its_rounds_refuses_a_fresh_start_over_them_and_overwrite_removes_them(tiny_clip_dir, tmp_path,
                                                                                             capsys):
    out = tmp_path / "prune"
    base = ["prune", "--model_name_or_path", str(tiny_clip_dir), "--steps_per_round", "1", "--batch_size", "4",
            "--embedded_size", "8", "--output_dir", str(out)]
    assert main([*base, "--num_rounds", "2"]) == 0
    assert (out / "round_02").is_dir()
    code, err = _exit_and_error([*base, "--num_rounds", "2", "--no_resume"], capsys)
    assert code == 2, err
    assert "round_01/" in err and "without --no_resume" in err and "--overwrite_output_dir" in err
    assert (out / "round_02").is_dir()
    assert main([*base, "--num_rounds", "1", "--overwrite_output_dir"]) == 0
    assert not (out / "round_02").exists()  # no round of the earlier run beside the new ones
    assert json.loads((out / "counts.json").read_text())["rounds"] == 1


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    import torch

    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("predict") / "model"
    CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16).save_pretrained(d)
    return d


def test_predict_after_a_killed_run_is_refused_and_overwrite_leaves_only_the_new_images(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = {}
    for name in ("a", "b"):
        images[name] = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images[name])
    out = tmp_path / "out"
    base = ["predict", "--model", str(model_dir), "--classes", "sky,road", "--output_dir", str(out)]
    assert main([*base, str(images["a"])]) == 0
    (out / "areas.json").unlink()  # killed before its areas.json: a's label map and overlay are left
    (out / "notes.txt").write_text("mine")

    code, err = _exit_and_error([*base, str(images["b"])], capsys)
    assert code == 2, err
    assert "a.labels.png" in err and "--overwrite_output_dir" in err
    assert not (out / "b.labels.png").exists()

    assert main([*base, "--overwrite_output_dir", str(images["b"])]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["areas.json", "b.labels.png", "b.overlay.png", "notes.txt"]
    assert list(json.loads((out / "areas.json").read_text())["images"]) == [str(images["b"])]


@pytest.fixture
def nothing_loads(monkeypatch):
    from opentrans_hf.commands import demo, pretrain_clip, reproduce

    def loaded(*args, **kwargs):
        raise AssertionError("work started before the output directory was checked")

    for module in (demo, reproduce):
        monkeypatch.setattr(module, "default_clip", loaded)
    monkeypatch.setattr(pretrain_clip, "pretrain_clip", loaded)


@pytest.mark.parametrize("argv, marker", [
    (["demo"], "summary.json"),
    (["reproduce", "--quick"], "results.json"),
    (["pretrain-clip", "--size", "tiny", "--max_steps", "1"], "notes.txt"),
])
def test_pipelines_refuse_a_finished_runs_directory_before_any_work(argv, marker, nothing_loads, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    code, err = _exit_and_error([*argv, "--output_dir", str(out)], capsys)
    assert code == 2, err
    assert str(out) in err and marker in err and "--overwrite_output_dir" in err
    assert (out / marker).read_text() == "{}"


def test_a_pipeline_resumes_an_unfinished_run_of_its_own(nothing_loads, tmp_path, capsys):
    """No summary.json: an unfinished demo, which a re-run resumes (it gets as far as its CLIP)."""
    out = tmp_path / "out"
    (out / "prune" / "round_01").mkdir(parents=True)
    (out / "prune" / "round_01" / "adapter_config.json").write_text("{}")
    code, err = _exit_and_error(["demo", "--output_dir", str(out)], capsys)
    assert code == 1 and "work started" in err


def test_claim_counts_and_removes_only_the_jobs_own_outputs(tmp_path):
    layout = OutputLayout("train", TRAIN_LAYOUT.names)
    out = tmp_path / "run"
    assert claim_output_dir(out, layout) == []  # missing: nothing to claim
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / LOCK_NAME).write_text("")  # only a lock file: no output
    assert claim_output_dir(out, layout) == []
    (out / "step_3" / "sub").mkdir(parents=True)
    (out / "step_3" / "sub" / "x.bin").write_bytes(b"1")
    (out / "metrics.json").write_text("{}")
    with pytest.raises(OutputDirInUse, match="metrics.json, step_3/"):
        claim_output_dir(out, layout)
    assert claim_output_dir(out, layout, resuming=True) == []
    assert (out / "step_3").exists()
    with output_dir_lock(out / "step_3"):  # a run holding a subfolder keeps its lock file there
        removed = claim_output_dir(out, layout, overwrite=True)
        assert [p.name for p in removed] == ["metrics.json", "step_3"]
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plots", "step_3"]
        assert [p.name for p in (out / "step_3").iterdir()] == [LOCK_NAME]
    assert claim_output_dir(out, layout) == []
