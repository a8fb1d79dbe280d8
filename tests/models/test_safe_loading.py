"""Fault probe class 4 (issue 24): pickles loaded, or refused with torch's text; and class 8's truncated
model.safetensors that gave a SafetensorError naming no file.

Model weights load from safetensors files only: a model (or CLIP) directory with only a ``torch.save``d
``pytorch_model.bin`` (or ``*.pt``, ``*.pth``, ``*.ckpt``) is refused in one line naming the file and saying how
to convert it. Checkpoint pickles (Accelerate's optimizer / scheduler / RNG states) are read with torch's
weights-only unpickler: a malicious one runs no code and is refused naming the file, not with torch's text
inviting ``weights_only=False``. A truncated safetensors file is named.
"""

import os
import shutil

import pytest
import torch
from transformers import AutoModel, CLIPModel

from opentrans_hf import CLIPDeepLabV3ForOVS
from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.models import CLIPDenseZeroShot

TORCH_TEXT = ("weights_only=False", "Weights only load failed", "SafetensorError", "PytorchStreamReader", "Traceback")


class Payload:
    """A pickle that runs ``touch MARKER`` when unpickled by anything but a weights-only unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    assert not any(text in line for line in lines for text in TORCH_TEXT), lines
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ovs") / "model"
    CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=30, seen_class_names=["sky", "grass"]).save_pretrained(d)
    return d


def _pickled_copy(src, dst, name="pytorch_model.bin", payload=None):
    """``dst``: ``src`` with model.safetensors replaced by a ``torch.save``d state dict named ``name``."""
    shutil.copytree(src, dst)
    state = CLIPDeepLabV3ForOVS.from_pretrained(src).state_dict() if payload is None else {"w": payload}
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / name)
    return dst


# --- model directories: safetensors only ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_evaluate_refuses_a_model_directory_with_only_pickled_weights(model_dir, tmp_path, capsys, name):
    d = _pickled_copy(model_dir, tmp_path / "model", name)
    rc = cli_main(["evaluate", "--model", str(d), "--max_examples", "2", "--out", str(tmp_path / "eval.json")])
    assert rc == 1
    line = _error_line(capsys)
    assert f"refused: {d / name} is a pickle" in line and "only from safetensors files" in line, line
    assert "save_pretrained" in line  # how to convert
    assert not (tmp_path / "eval.json").exists()


def test_a_malicious_pickle_in_a_model_directory_runs_no_code(model_dir, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = _pickled_copy(model_dir, tmp_path / "model", payload=Payload(marker))
    assert cli_main(["evaluate", "--model", str(d), "--max_examples", "2"]) == 1
    assert f"refused: {d / 'pytorch_model.bin'} is a pickle" in _error_line(capsys)
    for load in (AutoModel.from_pretrained, CLIPDeepLabV3ForOVS.from_pretrained):
        with pytest.raises(ValueError, match="is a pickle"):
            load(d)
    assert not marker.exists()


def test_predict_and_from_pretrained_refuse_pickled_weights(model_dir, tmp_path, capsys):
    from PIL import Image

    d = _pickled_copy(model_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=rf"refused: {d / 'pytorch_model.bin'} is a pickle"):
        AutoModel.from_pretrained(d)
    Image.new("RGB", (30, 30)).save(tmp_path / "img.png")
    assert cli_main(["predict", "--model", str(d), "--images", str(tmp_path / "img.png"), "--classes", "sky,grass",
                     "--output_dir", str(tmp_path / "pred")]) == 1
    assert "is a pickle" in _error_line(capsys)


def test_use_safetensors_false_is_refused(model_dir):
    with pytest.raises(ValueError, match="use_safetensors=False.*only from safetensors files"):
        CLIPDeepLabV3ForOVS.from_pretrained(model_dir, use_safetensors=False)


def test_pickles_beside_safetensors_are_never_read(model_dir, tmp_path):
    """A directory with model.safetensors loads from it; a pickle beside it (e.g. Trainer's training_args.bin,
    or anything else) is not opened."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    torch.save({"w": Payload(marker)}, d / "pytorch_model.bin")
    torch.save({"w": Payload(marker)}, d / "training_args.bin")
    model = AutoModel.from_pretrained(d)
    reference = CLIPDeepLabV3ForOVS.from_pretrained(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert not marker.exists()


def test_a_clip_directory_with_only_pickled_weights_is_refused(tiny_clip_dir, tmp_path, capsys):
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    torch.save(CLIPModel.from_pretrained(tiny_clip_dir).state_dict(), clip / "pytorch_model.bin")
    (clip / "model.safetensors").unlink()
    expected = f"refused: {clip / 'pytorch_model.bin'} is a pickle"
    with pytest.raises(ValueError, match=expected):
        CLIPDeepLabV3ForOVS.from_clip(str(clip))
    with pytest.raises(ValueError, match=expected):
        CLIPDenseZeroShot.from_pretrained(str(clip))
    for argv in (["train", "--model_name_or_path", str(clip), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                  "--embedded_size", "8"],
                 ["prune", "--model_name_or_path", str(clip), "--output_dir", str(tmp_path / "prune"), "--num_rounds", "1",
                  "--steps_per_round", "1", "--embedded_size", "8"],
                 ["analyze", str(clip), "--no-progress"]):
        rc = cli_main(argv)
        assert rc == 1 and expected in _error_line(capsys), argv


# --- truncated safetensors (class 8) ------------------------------------------------------------------------

def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_evaluate_names_a_truncated_model_safetensors(model_dir, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    _truncate(d / "model.safetensors")
    assert cli_main(["evaluate", "--model", str(d), "--max_examples", "2"]) == 1
    line = _error_line(capsys)
    assert f"cannot read {d / 'model.safetensors'}" in line and "not a complete safetensors file" in line, line
    assert "tensor(s) cut off: '" in line  # the header is intact: which tensors lack their data
    _truncate(d / "model.safetensors", keep=0.001)  # even the header cut off
    with pytest.raises(ValueError, match=rf"cannot read {d / 'model.safetensors'} .*header is cut off or corrupt"):
        AutoModel.from_pretrained(d)


def test_a_truncated_clip_checkpoint_is_named(tiny_clip_dir, tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    _truncate(clip / "model.safetensors")
    with pytest.raises(ValueError, match=rf"cannot read {clip / 'model.safetensors'} \(CLIP model weights\)"):
        CLIPDeepLabV3ForOVS.from_clip(str(clip))


# --- checkpoint pickles ---------------------------------------------------------------------------------------

RUN = ["--batch_size", "4", "--embedded_size", "16", "--max_eval_examples", "2", "--max_steps", "2",
       "--checkpointing_steps", "1"]


@pytest.fixture(scope="module")
def finished_run(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_training(parse_args("train", ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), *RUN]))
    return out


def _interrupted_run(finished_run, tmp_path):
    """A run killed after its step-1 checkpoint: only step_1 in the output directory."""
    out = tmp_path / "run"
    shutil.copytree(finished_run / "step_1", out / "step_1")
    return out


def _resume(tiny_clip_dir, out):
    return cli_main(["train", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), *RUN,
                     "--resume_from_checkpoint", "latest"])


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_malicious_checkpoint_pickle_runs_no_code_and_is_named(finished_run, tiny_clip_dir, tmp_path, capsys, name):
    out = _interrupted_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, out / "step_1" / name)
    assert _resume(tiny_clip_dir, out) == 1
    line = _error_line(capsys)
    assert f"refused: {out / 'step_1' / name} is not a plain tensor/state pickle" in line, line
    assert "weights-only unpickler" in line and "posix.system" in line
    assert not marker.exists() and not (out / "model").exists()


def test_a_truncated_checkpoint_file_is_named(finished_run, tiny_clip_dir, tmp_path, capsys):
    out = _interrupted_run(finished_run, tmp_path)
    _truncate(out / "step_1" / "optimizer.bin")
    assert _resume(tiny_clip_dir, out) == 1
    assert f"cannot read checkpoint file {out / 'step_1' / 'optimizer.bin'}" in _error_line(capsys)
    out = _interrupted_run(finished_run, tmp_path / "b")
    _truncate(out / "step_1" / "model.safetensors")
    assert _resume(tiny_clip_dir, out) == 1
    assert f"cannot read {out / 'step_1' / 'model.safetensors'}" in _error_line(capsys)


def test_an_intact_checkpoint_resumes(finished_run, tiny_clip_dir, tmp_path, capsys):
    out = _interrupted_run(finished_run, tmp_path)
    assert _resume(tiny_clip_dir, out) == 0, capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file()
