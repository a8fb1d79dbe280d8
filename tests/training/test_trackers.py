"""What ``train --report_to`` sends to the trackers, read back from tensorboard's event files."""

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, launch_two_processes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.models.configuration_ovs import SolverConfig
from opentrans_hf.training import tracking
from opentrans_hf.training.tracking import eval_scalars, hyperparameters, tracker_name
from opentrans_hf.utils.locking import LOCK_NAME

SPLIT = "embedded:validation"


def train(tiny_clip_dir, out, *extra):
    return run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
        "--embedded_size", "16", "--max_eval_examples", "4", "--learning_rate", "1e-3", *extra,
    ]))


def scalars(logdir: Path) -> dict:
    """``{tag: {step: value}}`` of every scalar in the run's event files."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def logged_hparams(logdir: Path) -> dict:
    """The hparams plugin's session-start values in the run's event files (any sub-directory)."""
    found = {}
    for path in logdir.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    found.update(data.session_start_info.hparams)
    return found


@pytest.mark.slow
def test_tensorboard_gets_eval_metrics_switch_throughput_and_typed_hparams(tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    metrics = train(tiny_clip_dir, out, "--max_steps", "4", "--eval_steps", "2", "--freeze_rule", "median",
                    "--spectral_warmup_steps", "1", "--report_to", "tensorboard")
    logdir = out / "opentrans-hf"
    got = scalars(logdir)
    name = tracker_name(SPLIT)
    assert name == "embedded_validation"

    # the evaluation at step 2 (history.json) and the final one at step 4 (metrics.json), to the float32 written
    history = json.loads((out / "history.json").read_text())
    saved = json.loads((out / "metrics.json").read_text())
    at_2 = next(e for e in history["eval"] if e["step"] == 2)
    final = saved["eval"][SPLIT]
    assert set(got[f"eval/{name}/mean_iou"]) == {2, 4}
    assert got[f"eval/{name}/mean_iou"][2] == pytest.approx(at_2[SPLIT], rel=1e-6, abs=1e-7)
    for key in ("mean_iou", "overall_accuracy", "mean_accuracy", "mean_iou_seen", "mean_iou_unseen"):
        assert got[f"eval/{name}/{key}"][4] == pytest.approx(final[key], rel=1e-6, abs=1e-7), key
    assert got[f"eval/{name}/mean_iou_unseen"][2] == pytest.approx(at_2[f"{SPLIT} unseen"], rel=1e-6, abs=1e-7)

    # the spectral switch at the end of the one warm-up step: its step and layer counts
    switch = saved["spectral_switch"]
    assert got["spectral/switch_step"] == {1: 1.0}
    assert got["spectral/frozen_layers"] == {1: len(switch["frozen_layers"])} and switch["frozen_layers"]
    assert got["spectral/trainable_layers"] == {1: len(switch["trainable_layers"])}

    # every optimizer step: loss, learning rate, throughput
    assert got["train/loss"] == pytest.approx(dict(zip(history["step"], history["loss"], strict=True)), rel=1e-6)
    for tag in ("lr", "train/steps_per_second", "train/images_per_second"):
        assert set(got[tag]) == {1, 2, 3, 4}, tag
    assert all(v > 0 for v in got["train/images_per_second"].values())
    # a step of batch 4 on one process: images/s is 4 times steps/s
    for step, ips in got["train/images_per_second"].items():
        assert ips == pytest.approx(4 * got["train/steps_per_second"][step], rel=1e-5)

    # the hyperparameters, typed: numbers as numbers (the solver's resolved values), strings as strings
    hp = logged_hparams(logdir)
    assert hp["learning_rate"].WhichOneof("kind") == "number_value" and hp["learning_rate"].number_value == 1e-3
    assert hp["weight_decay"].number_value == pytest.approx(SolverConfig().weight_decay)  # unset flag: the default
    assert hp["max_steps"].number_value == 4 and hp["total_steps"].number_value == 4
    assert hp["num_processes"].number_value == 1 and hp["spectral_warmup_steps"].number_value == 1
    assert hp["freeze_rule"].string_value == "median" and hp["framework"].string_value == "deeplabv3"
    assert hp["eval_datasets"].string_value == "[]"
    assert metrics["steps"] == 4
    assert "wandb" not in sys.modules  # only the tracker asked for is imported


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_log_once_and_finish(tiny_clip_dir, tmp_path):
    """Only the main process writes event files; images/s counts both processes' batches; the run ends (closing
    the trackers with ``end_training`` destroyed the process group and hung the launch after the last write)."""
    out = tmp_path / "run"
    res = launch_two_processes(ROOT / "scripts" / "train.py", "--model_name_or_path", tiny_clip_dir,
                               "--output_dir", out, "--max_steps", "3", "--eval_steps", "2", "--batch_size", "4",
                               "--embedded_size", "16", "--max_eval_examples", "4", "--report_to", "tensorboard",
                               port=29663, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / LOCK_NAME).exists()  # released: the run ended on every rank
    assert len(list((out / "opentrans-hf").rglob("events.out.tfevents.*"))) == 2  # scalars + hparams, main only
    got = scalars(out / "opentrans-hf")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_processes"] == 2
    name = tracker_name(SPLIT)
    assert got[f"eval/{name}/mean_iou"][3] == pytest.approx(saved["eval"][SPLIT]["mean_iou"], rel=1e-6, abs=1e-7)
    assert set(got[f"eval/{name}/mean_iou"]) == {2, 3}
    for step, ips in got["train/images_per_second"].items():  # 4 images per process per step
        assert ips == pytest.approx(8 * got["train/steps_per_second"][step], rel=1e-5)
    assert logged_hparams(out / "opentrans-hf")["num_processes"].number_value == 2


def test_hyperparameters_keep_types_and_stringify_the_rest():
    args = parse_args("train", ["--output_dir", "o", "--report_to", "tensorboard", "--max_steps", "7",
                                "--eval_datasets", "embedded", "--weight_decay", "0.05"])
    hp = hyperparameters(args, SolverConfig().replace(weight_decay=0.05), total_steps=7, num_processes=2)
    assert hp["max_steps"] == 7 and type(hp["max_steps"]) is int
    assert hp["num_epochs"] == 3.0 and type(hp["num_epochs"]) is float
    assert hp["reduce_labels"] is False and hp["push_to_hub"] is False
    assert hp["learning_rate"] == SolverConfig().learning_rate and type(hp["learning_rate"]) is float
    assert hp["weight_decay"] == 0.05 and hp["warmup_steps"] == 0 and type(hp["warmup_steps"]) is int
    assert hp["max_grad_norm"] == "None" and hp["model_name_or_path"] == "None"
    assert hp["eval_datasets"] == '["embedded"]'
    assert hp["total_steps"] == 7 and hp["num_processes"] == 2
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())


def test_eval_scalars_per_dataset_with_tracker_safe_names():
    results = {"embedded:validation": {"mean_iou": 0.25, "overall_accuracy": 0.5, "mean_accuracy": 0.375,
                                       "mean_iou_seen": 0.3, "mean_iou_unseen": None, "per_category_iou": [0.25]},
               "ade20k-150": {"mean_iou": 0.125, "overall_accuracy": 0.75}}
    assert eval_scalars(results) == {
        "eval/embedded_validation/mean_iou": 0.25, "eval/embedded_validation/overall_accuracy": 0.5,
        "eval/embedded_validation/mean_accuracy": 0.375, "eval/embedded_validation/mean_iou_seen": 0.3,
        "eval/ade20k-150/mean_iou": 0.125, "eval/ade20k-150/overall_accuracy": 0.75,
    }


def test_a_tracker_not_installed_or_unknown_is_refused_before_the_run(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "get_available_trackers", list)  # as where no tracker package is installed
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--report_to wandb: the 'wandb' tracker's package is not installed "
                                         r"\(pip install wandb\)"):
        train(tiny_clip_dir, out, "--max_steps", "1", "--report_to", "wandb")
    with pytest.raises(ValueError, match="'tensorbord' is not a tracker; choose from"):
        train(tiny_clip_dir, out, "--max_steps", "1", "--report_to", "tensorboard,tensorbord")
    assert not out.exists()
    assert tracking.trackers(None) is None and tracking.trackers("all") == ["all"]
