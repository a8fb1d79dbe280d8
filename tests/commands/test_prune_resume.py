"""`opentrans-hf prune` killed with -9 after a finished round and run again resumes bit-identically: the final
mask, every round's mask and the distilled student equal an uninterrupted run's, bit for bit (the data order,
the RNGs and the distillation's state of the round it resumes after are restored, not re-drawn)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, kill_when, launch_two_processes
from safetensors.torch import load_file

from opentrans_hf import SparseMask

ROUNDS = 3


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OPENTRANS_HF_VERBOSITY="warning")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def prune_args(tiny_clip_dir, out, rounds=ROUNDS):
    # 8 images in batches of 3: every round restarts the shuffled loader twice, mid-epoch; the default
    # --scope global, the region loss on (the embedded dataset has label maps), the augmentations on
    return ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--embedded_size", "8",
            "--batch_size", "3", "--num_rounds", str(rounds), "--steps_per_round", "5", "--rate", "0.2",
            "--learning_rate", "1e-2"]


def prune_cmd(tiny_clip_dir, out):
    return [sys.executable, "-m", "opentrans_hf.cli", "prune", *prune_args(tiny_clip_dir, out)]


def saved_round(out) -> int:
    try:
        return json.loads((out / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def kill_after_round(cmd, out, round_: int) -> int:
    """Run ``cmd``, SIGKILL it as soon as round ``round_`` is saved (state.json, written last); the round saved."""
    kill_when(cmd, lambda: saved_round(out) >= round_, env=_env(), what=f"finished round {round_}")
    return saved_round(out)


def run(cmd):
    res = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def assert_masks_equal(a: SparseMask, b: SparseMask, what: str):
    assert a.masks.keys() == b.masks.keys(), what
    differing = {k: int((a.masks[k] != b.masks[k]).sum()) for k in a.masks if not torch.equal(a.masks[k], b.masks[k])}
    assert not differing, f"{what}: positions that differ per layer {differing}"


@pytest.mark.slow
def test_prune_killed_after_round_2_resumes_bit_identical(tiny_clip_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(prune_cmd(tiny_clip_dir, whole))
    saved = kill_after_round(prune_cmd(tiny_clip_dir, killed), killed, 2)
    assert 2 <= saved < ROUNDS and not (killed / "mask").exists()  # killed mid-run, rounds left to do
    run(prune_cmd(tiny_clip_dir, killed))  # the rerun resumes (no flag needed)

    assert_masks_equal(SparseMask.from_pretrained(killed / "mask"), SparseMask.from_pretrained(whole / "mask"),
                       "final mask")
    for r in range(1, ROUNDS + 1):
        assert_masks_equal(SparseMask.from_pretrained(killed / f"round_{r:02d}"),
                           SparseMask.from_pretrained(whole / f"round_{r:02d}"), f"round {r}")
    a, b = load_file(killed / "student.safetensors"), load_file(whole / "student.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # the distilled weights, bitwise
    history = lambda out: json.loads((out / "state.json").read_text())["history"]
    assert history(killed) == history(whole)  # the per-round losses too
    counts = lambda out: {k: v for k, v in json.loads((out / "counts.json").read_text()).items() if k != "mask"}
    assert counts(killed) == counts(whole)


@pytest.mark.slow
def test_two_process_prune_resumed_after_round_1_is_bit_identical(tiny_clip_dir, tmp_path):
    """Under 2 processes every process restores the saved generator states: 2 rounds in one go, or 1 round
    and then 1 more in a second launch, give the same masks and student."""
    def launch(out, rounds, port):
        res = launch_two_processes(ROOT / "scripts" / "prune.py", *prune_args(tiny_clip_dir, out, rounds), port=port,
                                   env={"OPENTRANS_HF_VERBOSITY": "warning", "PYTHONPATH": _env()["PYTHONPATH"]})
        assert res.returncode == 0, res.stderr[-3000:]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(whole, 2, 29687)
    launch(resumed, 1, 29689)
    launch(resumed, 2, 29691)  # resumes after round 1 (more rounds of the same run)
    assert_masks_equal(SparseMask.from_pretrained(resumed / "mask"), SparseMask.from_pretrained(whole / "mask"),
                       "final mask")
    a, b = load_file(resumed / "student.safetensors"), load_file(whole / "student.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    history = lambda out: json.loads((out / "state.json").read_text())["history"]
    assert history(resumed) == history(whole)
    assert json.loads((whole / "counts.json").read_text())["num_processes"] == 2
