"""Training that cannot write a broken model, and checkpoints that resume only what they should.

Divergence (a non-finite loss, gradient or weight) stops the run with the step and the value, writes no
model and keeps the last good checkpoint, also under 2 processes; the model directory is written before
anything that can fail after training; checkpoints are complete or absent (a real kill -9 mid-write),
found by their recorded step, and resumed only under the arguments they were made with.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import HELPERS, ROOT, kill_when, launch_two_processes
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training


def train_argv(tiny_clip_dir, out, *extra):
    return ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
            "--embedded_size", "8", "--max_eval_examples", "2", "--learning_rate", "1e-3", *extra]


def train(tiny_clip_dir, out, *extra):
    return run_training(parse_args("train", train_argv(tiny_clip_dir, out, *extra)))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _finite(path: Path) -> bool:
    return all(bool(t.isfinite().all()) for t in load_file(path).values() if t.is_floating_point())


# --- divergence ------------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_divergence_stops_with_step_and_value_keeps_last_checkpoint_never_pushes(
        tiny_clip_dir, tmp_path, monkeypatch, capsys, accumulation):
    from opentrans_hf.cli import main as cli_main

    pushed = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("opentrans_hf.utils.hub.is_offline", lambda: False)
    monkeypatch.setattr("opentrans_hf.utils.hub.push_folder_to_hub", lambda *a, **k: pushed.append(a) or "url")
    out = tmp_path / "run"
    # lr 1e6: step 1 leaves huge but finite weights, step 2's loss is NaN (it used to exit 0 with NaN weights)
    rc = cli_main(["train", *train_argv(tiny_clip_dir, out, "--learning_rate", "1e6", "--max_steps", "4",
                                        "--checkpointing_steps", "1", "--gradient_accumulation_steps", accumulation,
                                        "--push_to_hub", "--hub_model_id", "me/ovs")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "diverged at step 2" in err and "nan" in err and str(out / "step_1") in err, err
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert not (out / "step_2").exists()
    assert (out / "step_1" / "checkpoint.json").is_file() and _finite(out / "step_1" / "model.safetensors")
    assert pushed == []
    assert not (out / ".opentrans-hf.lock").exists()  # released on the error


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_stop_together_when_one_diverges(tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    # only process 1 sees a NaN loss at step 3; process 0 must stop there too (not hang, not save step 3)
    res = launch_two_processes(HELPERS / "ddp_train_args.py", *train_argv(tiny_clip_dir, out, "--max_steps", "4",
                                                                         "--batch_size", "2", "--checkpointing_steps", "1"),
                               port=29631, env=dict(_env(), FAKE_NONFINITE_STEP="3"), timeout=300)
    assert res.returncode != 0
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert "TrainingDiverged" in report["error"] and "step 3" in report["error"], report
        assert "on process 1" in report["error"]
    assert (out / "step_2" / "checkpoint.json").is_file() and not (out / "step_3").exists()
    assert not (out / "model").exists() and not (out / ".opentrans-hf.lock").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_stop_together_when_one_fails_writing_a_checkpoint(tiny_clip_dir, tmp_path):
    """Process 1 alone fails writing its part of the 2nd checkpoint (disk full): both stop, naming it, the partial
    checkpoint is removed and the first is kept; no process waits at a barrier for the failed one."""
    out = tmp_path / "run"
    res = launch_two_processes(HELPERS / "ddp_train_args.py", *train_argv(tiny_clip_dir, out, "--max_steps", "4",
                                                                         "--batch_size", "2", "--checkpointing_steps", "1"),
                               port=29633, env=dict(_env(), FAKE_SAVE_FAILURE="2"), timeout=300)
    assert res.returncode != 0
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "No space left on device" in reports[1]["error"], reports
    assert "process 1 failed" in reports[0]["error"] and "No space left on device" in reports[0]["error"], reports
    assert (out / "step_1" / "checkpoint.json").is_file() and not (out / "step_2").exists()
    assert not list(out.glob(".step_*.partial")) and not (out / ".opentrans-hf.lock").exists()


def test_evaluate_refuses_non_finite_weights_naming_the_parameter(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import evaluate
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    model = CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=30, seen_class_names=["sky", "grass"])
    model.save_pretrained(tmp_path / "model")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("weight") and weights[n].is_floating_point())
    weights[name][(0,) * weights[name].dim()] = float("nan")
    save_file(weights, str(tmp_path / "model" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"non-finite weights: parameter {name} holds nan"):
        evaluate.run(parse_args("evaluate", ["--model", str(tmp_path / "model"), "--max_examples", "2"]))


# --- the model is written before what can fail after training ----------------------------------------

@pytest.mark.parametrize("failing", ["card", "mask_adapter"])
def test_failure_after_training_keeps_the_model_and_says_what_failed(tiny_clip_dir, tmp_path, monkeypatch, failing):
    from transformers import CLIPModel

    from opentrans_hf import SparseMask, magnitude_prune

    mask_dir = tmp_path / "mask"
    magnitude_prune(CLIPModel.from_pretrained(tiny_clip_dir), 0.5).save_pretrained(mask_dir)

    def boom(*a, **k):
        raise ValueError("unknown format code 'f' for object of type 'str'")

    if failing == "card":
        monkeypatch.setattr("opentrans_hf.training.outputs.render_training_card", boom)
        what = "writing the model card"
    else:  # e.g. a mask whose card cannot render ("target_sparsity": "high")
        monkeypatch.setattr(SparseMask, "save_pretrained", boom)
        what = "saving its mask_adapter"
    out = tmp_path / "run"
    with pytest.raises(Exception, match=rf"model is saved at {out / 'model'}, but {what}.* failed: .*unknown format") as info:
        train(tiny_clip_dir, out, "--max_steps", "2", "--mask", str(mask_dir))
    assert type(info.value).__name__ == "IncompleteOutputs"
    model = AutoModel.from_pretrained(out / "model")  # the trained model survived
    assert model.config.seen_class_names and _finite(out / "model" / "model.safetensors")


# --- checkpoints ---------------------------------------------------------------------------------------

def test_resume_refuses_other_arguments_unless_told(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_clip_dir, out, "--max_steps", "2", "--checkpointing_steps", "2")
    # a stale checkpoint of an earlier run used to be resumed silently under the new arguments
    with pytest.raises(ValueError, match=r"learning_rate: 0\.001 in the checkpoint, 0\.01 now.*seed: 0 in the "
                                         r"checkpoint, 3 now.*--ignore_checkpoint_mismatch") as info:
        train(tiny_clip_dir, out, "--max_steps", "2", "--learning_rate", "1e-2", "--seed", "3",
              "--resume_from_checkpoint", "latest")
    assert type(info.value).__name__ == "CheckpointMismatch"
    metrics = train(tiny_clip_dir, out, "--max_steps", "2", "--learning_rate", "1e-2", "--resume_from_checkpoint",
                    "latest", "--ignore_checkpoint_mismatch")
    assert metrics["steps"] == 2
    err = capsys.readouterr().err  # a warning of the library's log: shown at its default level
    assert "despite other arguments" in err and "warning: resuming" in err


def test_latest_is_the_highest_recorded_step_and_other_dirs_are_ignored(tiny_clip_dir, tmp_path, capsys, info_logs):
    out = tmp_path / "run"
    train(tiny_clip_dir, out, "--max_steps", "4", "--checkpointing_steps", "2")
    shutil.copytree(out / "step_2", out / "step_10")  # named like a later step, records step 2
    (out / "step_best").mkdir()  # not a checkpoint (this used to fail with "invalid literal for int()")
    (out / "step_3").mkdir()  # an incomplete one
    capsys.readouterr()
    metrics = train(tiny_clip_dir, out, "--max_steps", "4", "--checkpointing_steps", "2",
                    "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().err  # the library's log
    assert f"resumed from {out / 'step_4'} at step 4" in printed
    assert "step_best" in printed and "step_3" in printed  # named as ignored
    assert metrics["steps"] == 4
    with pytest.raises(ValueError, match=r"step_best is not a complete opentrans-hf checkpoint: it has no checkpoint.json"):
        train(tiny_clip_dir, out, "--max_steps", "4", "--resume_from_checkpoint", str(out / "step_best"))


@pytest.mark.slow
def test_killed_checkpoint_write_leaves_no_step_and_resume_continues(tiny_clip_dir, tmp_path):
    from opentrans_hf.utils.locking import StaleLockWarning

    out, marker = tmp_path / "run", tmp_path / "saving"
    env = dict(_env(), SLOW_CHECKPOINT_STEP="4", SLOW_CHECKPOINT_MARKER=str(marker))
    args = train_argv(tiny_clip_dir, out, "--max_steps", "6", "--checkpointing_steps", "2")
    pid = kill_when([sys.executable, str(HELPERS / "train_slow_checkpoint.py"), *args],
                    marker.exists,  # the state of step 4 is being written
                    env=env, what="reached its step-4 checkpoint", timeout=180, poll=0.2)
    assert not (out / "step_4").exists()  # the killed write left nothing that looks like a checkpoint
    assert (out / "step_2" / "checkpoint.json").is_file()
    # resume: the dead run's lock is taken over, the partial write removed, training continues from step 2
    with pytest.warns(StaleLockWarning, match=rf"pid {pid} .*is no longer running"):
        metrics = train(tiny_clip_dir, out, "--max_steps", "6", "--checkpointing_steps", "2",
                        "--resume_from_checkpoint", "latest")
    assert metrics["steps"] == 6
    assert [p.name for p in out.iterdir() if p.name.startswith(".step_")] == []
    for step in (2, 4, 6):
        assert json.loads((out / f"step_{step}" / "checkpoint.json").read_text())["step"] == step
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
