"""One run per output directory: a second run (a real second process) fails at once naming the holder;
a lock left by a dead process is taken over; train, prune and demo all hold their directory."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HELPERS, ROOT

from opentrans_hf.commands import parse_args

LOCK = ".opentrans-hf.lock"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def train_argv(tiny_clip_dir, out, *extra):
    return ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
            "--embedded_size", "8", "--max_eval_examples", "2", *extra]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_second_run_on_the_same_directory_fails_at_once_naming_the_holder(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import demo, prune

    out, marker = tmp_path / "demo" / "train", tmp_path / "saving"
    # the first run: a real training process, held up in its step-2 checkpoint
    env = dict(_env(), SLOW_CHECKPOINT_STEP="2", SLOW_CHECKPOINT_MARKER=str(marker))
    holder = subprocess.Popen([sys.executable, str(HELPERS / "train_slow_checkpoint.py"),
                               *train_argv(tiny_clip_dir, out, "--max_steps", "4", "--checkpointing_steps", "2")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert holder.poll() is None, holder.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run never reached its checkpoint"
            time.sleep(0.2)
        # a second process on the same directory (it used to train too and exit 0, mixing checkpoints)
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "opentrans_hf.cli", "train",
                                 *train_argv(tiny_clip_dir, out, "--max_steps", "4", "--checkpointing_steps", "2")],
                                env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"in use by pid {holder.pid} on host {socket.gethostname()} (opentrans-hf train" in second.stderr
        assert "%|" not in second.stderr  # it failed before loading or training anything: no progress bar
        assert time.time() - t0 < 120
        # prune and demo refuse the directory too (in this process)
        with pytest.raises(RuntimeError, match=rf"in use by pid {holder.pid}"):
            prune.run(parse_args("prune", ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out),
                                           "--num_rounds", "1", "--steps_per_round", "1", "--embedded_size", "8"]))
        # the demo refuses a directory whose train/ is in use, before its first step
        with pytest.raises(RuntimeError, match=rf"{out} is in use by pid {holder.pid}"):
            demo.run(parse_args("demo", ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out.parent),
                                         "--max_steps", "1"]))
        assert not (out.parent / "prune").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stderr.close()
    assert not (out / "step_4").exists() and not (out / "model").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands.train import run as run_training
    from opentrans_hf.utils.locking import StaleLockWarning

    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "train"}))
    with pytest.warns(StaleLockWarning, match=rf"left by pid {pid} on host .*is no longer running"):
        metrics = run_training(parse_args("train", train_argv(tiny_clip_dir, out, "--max_steps", "1")))
    assert metrics["steps"] == 1 and (out / "model").is_dir()
    assert not (out / LOCK).exists()  # released at the end


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    from opentrans_hf.utils.locking import OutputDirLocked, output_dir_lock

    (tmp_path / LOCK).write_text(json.dumps({"pid": 4242, "host": "elsewhere", "command": "prune"}))
    with pytest.raises(OutputDirLocked, match=rf"pid 4242 on host elsewhere .*delete {tmp_path / LOCK}"):
        with output_dir_lock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "elsewhere"  # left alone


def test_lock_is_per_directory_reentrant_in_a_process_and_released_on_errors(tmp_path):
    from opentrans_hf.utils.locking import output_dir_lock

    with output_dir_lock(tmp_path, command="demo"):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["command"] == "demo"
        with output_dir_lock(tmp_path / "train"), output_dir_lock(tmp_path):  # sub-jobs of the same process
            assert (tmp_path / "train" / LOCK).is_file()
        assert not (tmp_path / "train" / LOCK).exists() and (tmp_path / LOCK).is_file()
        # another process is refused while this one holds it (the module alone: no torch import, fast)
        locking = Path(__file__).parents[2] / "opentrans_hf" / "utils" / "locking.py"
        probe = subprocess.run([sys.executable, "-c", "import importlib.util as u, sys\n"
                                f"spec = u.spec_from_file_location('locking', {str(locking)!r})\n"
                                "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
                                f"m.OutputDirLock({str(tmp_path)!r}).acquire()"],
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 1 and f"in use by pid {os.getpid()}" in probe.stderr, probe.stderr
    assert not (tmp_path / LOCK).exists()
    with pytest.raises(KeyError):
        with output_dir_lock(tmp_path):
            raise KeyError("boom")
    assert not (tmp_path / LOCK).exists()


def test_without_flock_a_live_holder_of_this_host_is_refused_and_a_dead_one_taken_over(tmp_path, monkeypatch):
    """Where the filesystem has no ``flock`` (some network filesystems) the holder's pid is the only check."""
    import errno
    import fcntl

    from opentrans_hf.utils.locking import OutputDirLocked, StaleLockWarning, output_dir_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "command": "train"}))
        with (pytest.raises(OutputDirLocked, match=rf"in use by pid {live.pid} on host .*\(opentrans-hf train\)"),
              output_dir_lock(tmp_path)):
            pass
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == live.pid  # left alone
    finally:
        live.kill()
        live.wait()
    dead = _dead_pid()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train"}))
    with (pytest.warns(StaleLockWarning, match=rf"left by pid {dead} on host .*is no longer running"),
          output_dir_lock(tmp_path, command="prune")):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()
