"""Errors that name nothing (issue 24, class 8, the disk-full probe): an OS-level failure (ENOSPC, EACCES, EEXIST)
while writing a checkpoint, the model or an output is one line that names the path, the reason and what was kept
(the last complete checkpoint); a partial checkpoint is removed, the run exits non-zero, and what was kept
resumes.

The writers are patched to fail part-way (as a full disk makes them fail: Python's ``OSError``, torch's
"[enforce fail at inline_container.cc:672] . unexpected pos ..." of a short write, safetensors' "I/O error: No
space left on device (os error 28)"), and to refuse with EACCES as a read-only directory does (the tests
may run as root, for whom chmod makes nothing read-only)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from opentrans_hf.cli import main as cli_main
from opentrans_hf.training.checkpoints import read_checkpoint
from opentrans_hf.utils.io import WriteError, atomic_directory, atomic_write_text, atomic_write_with

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def train_argv(tiny_clip_dir, out, *extra):
    return ["train", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
            "--embedded_size", "8", "--max_eval_examples", "2", "--learning_rate", "1e-3", *extra]


def error_line(err: str, job: str = "train") -> str:
    # progress bars redraw with \r: the error follows one on the same line
    lines = [line[line.index(f"opentrans-hf {job}: error:"):] for line in err.splitlines()
             if f"opentrans-hf {job}: error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def hidden(out: Path) -> list[str]:
    """Hidden entries of ``out`` (a temporary or partial write), but its lock; a run that fails before writing
    anything removes the output directory it made."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".opentrans-hf.lock")


def fail_torch_save_in(part: str, error):
    """A ``torch.save`` that, writing into a directory whose name contains ``part``, writes the first bytes
    and then fails with ``error`` (a full disk mid-write); elsewhere the real one."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if part in str(f):
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 60)
            raise error(f) if callable(error) else error
        return real(obj, f, *args, **kwargs)

    return save


# --- checkpoints through the train job -----------------------------------------------------------------


def test_disk_full_mid_checkpoint_removes_the_partial_one_and_keeps_the_last(tiny_clip_dir, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "run"
    argv = train_argv(tiny_clip_dir, out, "--max_steps", "2", "--checkpointing_steps", "1")
    monkeypatch.setattr(torch, "save", fail_torch_save_in(
        ".step_2.partial", lambda f: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))))
    assert cli_main(argv) == 1
    line = error_line(capsys.readouterr().err)
    assert line == (f"opentrans-hf train: error: cannot write checkpoint {out / 'step_2'}: No space left on device "
                    f"(optimizer.bin); removed the partial checkpoint; kept: the last complete checkpoint "
                    f"{out / 'step_1'} (step 1), which --resume_from_checkpoint latest resumes")
    assert hidden(out) == [] and not (out / "step_2").exists() and not (out / "model").exists()
    assert read_checkpoint(out / "step_1")["step"] == 1
    monkeypatch.undo()
    # what was kept resumes
    assert cli_main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert (out / "model" / "model.safetensors").is_file() and read_checkpoint(out / "step_2")["step"] == 2


def test_torchs_short_write_on_a_full_disk_reads_as_one(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """torch reports a short write as "unexpected pos"; on a filesystem with (almost) no space left that is a
    full disk, and says so instead of torch's text."""
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", fail_torch_save_in(".step_1.partial", RuntimeError(TORCH_SHORT_WRITE)))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    assert cli_main(train_argv(tiny_clip_dir, out, "--max_steps", "1", "--checkpointing_steps", "1")) == 1
    line = error_line(capsys.readouterr().err)
    assert line == (f"opentrans-hf train: error: cannot write checkpoint {out / 'step_1'}: No space left on device "
                    "(the write stopped part-way, 4.0 KiB left); removed the partial checkpoint; no complete "
                    "checkpoint is kept (none was written before)")
    assert "inline_container" not in line and hidden(out) == [] and not (out / "step_1").exists()


def test_read_only_output_directory_while_checkpointing(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", fail_torch_save_in(
        ".step_1.partial", lambda f: PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(f))))
    assert cli_main(train_argv(tiny_clip_dir, out, "--max_steps", "1", "--checkpointing_steps", "1")) == 1
    line = error_line(capsys.readouterr().err)
    assert line == (f"opentrans-hf train: error: cannot write checkpoint {out / 'step_1'}: Permission denied "
                    "(optimizer.bin); removed the partial checkpoint; no complete checkpoint is kept (none was "
                    "written before)")
    assert hidden(out) == []


def test_disk_full_while_writing_the_model_names_the_checkpoint_to_resume(tiny_clip_dir, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    assert cli_main(train_argv(tiny_clip_dir, out, "--max_steps", "1", "--checkpointing_steps", "1")) == 1
    line = error_line(capsys.readouterr().err)
    assert line == (f"opentrans-hf train: error: cannot write {out / 'model'}: No space left on device; nothing was "
                    f"written under that name; kept: the last complete checkpoint {out / 'step_1'} (step 1), which "
                    "--resume_from_checkpoint latest resumes")
    assert not (out / "model").exists() and hidden(out) == []


def test_disk_full_while_writing_the_metrics_keeps_the_model(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".metrics.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert cli_main(train_argv(tiny_clip_dir, out, "--max_steps", "1")) == 1
    line = error_line(capsys.readouterr().err)
    assert f"the trained model is saved at {out / 'model'}" in line
    assert f"cannot write {out / 'metrics.json'}: No space left on device; nothing was written under that name" in line
    assert (out / "model" / "model.safetensors").is_file() and not (out / "metrics.json").exists()
    assert hidden(out) == []


# --- the atomic writers ----------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("earlier")

    def half_then_full(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(WriteError) as err:
        atomic_write_with(path, half_then_full)
    assert str(err.value) == f"cannot write {path}: No space left on device; {path} was left as it was"
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert path.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize(("error", "reason", "code"), [
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device", errno.ENOSPC),
    (SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"),
     "Permission denied", errno.EACCES),
    (RuntimeError(TORCH_SHORT_WRITE), "the write stopped part-way", None),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
     "the write stopped part-way", None),
])
def test_library_write_errors_become_one_line(tmp_path, error, reason, code):
    def fail(tmp):
        raise error

    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'w.bin'}: {reason}") as err:
        atomic_write_with(tmp_path / "w.bin", fail)
    assert err.value.errno == code and list(tmp_path.iterdir()) == []
    if code is None:  # not known to be a full disk: the free space and torch's words are given
        assert "free on its filesystem" in str(err.value) and str(error) in str(err.value)


def test_other_errors_pass_unchanged(tmp_path):
    def fail(tmp):
        raise ValueError("not an OS error")

    with pytest.raises(ValueError, match="^not an OS error$"):
        atomic_write_with(tmp_path / "x", fail)
    with pytest.raises(RuntimeError, match="^a bug$"), atomic_directory(tmp_path / "d"):
        raise RuntimeError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "out").write_text("a file, not a directory")
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'out' / 'metrics.json'}: {tmp_path / 'out'} is "
                                         "a file where a directory is needed; nothing was written under that name$"):
        atomic_write_text(tmp_path / "out" / "metrics.json", "{}")
    with pytest.raises(WriteError, match=rf"{tmp_path / 'out'} is a file where a directory is needed") as err, \
            atomic_directory(tmp_path / "out" / "model"):
        pass
    assert err.value.errno in (errno.EEXIST, errno.ENOTDIR)


def test_a_read_only_directory_is_named(tmp_path, monkeypatch):
    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmpfile"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'a.json'}: Permission denied \("):
        atomic_write_text(tmp_path / "a.json", "{}")
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'model'}: Permission denied") as err, \
            atomic_directory(tmp_path / "model"):
        pass
    assert err.value.errno == errno.EACCES


def test_a_failed_write_inside_a_directory_names_the_directory_and_the_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("earlier")

    def full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as err, atomic_directory(tmp_path / "model") as tmp:
        atomic_write_with(tmp / "model.safetensors", full)
    assert str(err.value) == (f"cannot write {tmp_path / 'model'}: No space left on device (writing "
                              f"model.safetensors); {tmp_path / 'model'} was left as it was")
    assert (tmp_path / "model" / "config.json").read_text() == "earlier" and hidden(tmp_path) == []


def test_a_failed_rename_puts_the_earlier_directory_back(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("earlier")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory onto the name (the first moved the earlier one aside)
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=r"Invalid cross-device link") as err, \
            atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("new")
    assert str(err.value).endswith(f"{tmp_path / 'model'} was left as it was")
    assert (tmp_path / "model" / "config.json").read_text() == "earlier" and hidden(tmp_path) == []
