"""Distributed runs end: no collective is entered by one rank alone, no rank is left waiting for a main process
that failed, and a launch that asked for more processes than it got says so before anything loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, launch_two_processes


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_build_the_default_clip_into_an_empty_cache(tmp_path):
    """The README's 2-process command on a fresh machine hung: the main process built the pretrained CLIP and its
    zero-shot evaluation entered an all_reduce while the other rank waited at a barrier."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    res = launch_two_processes(ROOT / "tests" / "helpers" / "ddp_pretrained_clip.py", cache, out, port=29671,
                               timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["path"] == ranks[1]["path"]
    built = Path(ranks[0]["path"])
    assert (built / "model.safetensors").is_file()
    record = json.loads((built / "pretraining.json").read_text())
    assert record["processes"] == 1  # built by the main process alone
    assert 0 <= record["zero_shot"]["dense_mean_iou"] <= 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_main_process_failure_stops_every_rank(tmp_path):
    """The main process fails building the CLIP (the cache is a file): the other rank hears of it and fails too,
    instead of waiting at the barrier for ever."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.write_text("not a directory")
    out.mkdir()
    res = launch_two_processes(ROOT / "tests" / "helpers" / "ddp_pretrained_clip.py", cache, out, port=29672,
                               timeout=200)
    assert res.returncode != 0
    assert "the main process failed" in res.stdout + res.stderr
    assert not list(out.glob("rank*.json"))


def test_a_launch_that_starts_fewer_processes_than_asked_says_so(tiny_clip_dir, tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu starts one CPU process: the job stops before
    loading anything, naming the fix, instead of training alone with no word."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "train.py"),
           "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--max_steps", "2",
           "--embedded_size", "8", "--max_eval_examples", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert lines and "2 processes" in lines[-1] and "--multi_gpu" in lines[-1], res.stderr[-2000:]
    assert not (out / "model").exists()


def test_requested_processes_reads_the_launcher_arguments():
    from opentrans_hf.utils.distributed import requested_processes

    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    assert requested_processes(launch + ["--num_processes", "2", "train.py", "--num_processes", "9"]) == 2
    assert requested_processes(launch + ["--num_processes=3", "train.py"]) == 3
    assert requested_processes(["/usr/bin/accelerate", "launch", "--cpu", "train.py"]) is None
    assert requested_processes([sys.executable, "train.py", "--num_processes", "2"]) is None  # not a launcher
    assert requested_processes([]) is None
