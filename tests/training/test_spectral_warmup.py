"""`train --spectral_warmup_steps N`: the paper's protocol (alpha measured after N steps of fine-tuning every
target layer, then the small-alpha layers frozen), with resume before and after the switch and under DDP."""

import json
import shutil

import pytest
import torch
from conftest import HELPERS, launch_two_processes
from safetensors.torch import load_file

from opentrans_hf import SpectralTuningConfig
from opentrans_hf.commands import ArgumentError, parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.models import CLIPDeepLabV3ForOVS
from opentrans_hf.spectral import analyze_spectra
from opentrans_hf.training.checkpoints import CheckpointMismatch

RUN = ["--max_steps", "4", "--spectral_warmup_steps", "2", "--freeze_rule", "median", "--checkpointing_steps", "1",
       "--batch_size", "2", "--gradient_accumulation_steps", "2"]


def train(tiny_clip_dir, out, *extra):
    return run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--embedded_size", "16",
        "--max_eval_examples", "2", "--learning_rate", "1e-3", *extra,
    ]))


def test_warmup_arguments():
    with pytest.raises(ArgumentError, match="--spectral_warmup_steps 2 needs a rule"):
        parse_args("train", ["--spectral_warmup_steps", "2"])
    with pytest.raises(ArgumentError, match=">= 0"):
        parse_args("train", ["--spectral_warmup_steps", "-1", "--freeze_rule", "median"])
    with pytest.raises(ArgumentError, match="below --max_steps 5"):
        parse_args("train", ["--spectral_warmup_steps", "5", "--max_steps", "5", "--freeze_rule", "median"])
    args = parse_args("train", ["--spectral_warmup_steps", "3", "--freeze_rule", "ratio"])
    assert args.spectral_warmup_steps == 3 and parse_args("train", []).spectral_warmup_steps == 0


def test_demo_warmup_argument():
    with pytest.raises(ArgumentError, match="below --max_steps 4"):
        parse_args("demo", ["--spectral_warmup_steps", "4", "--max_steps", "4"])
    assert parse_args("demo", ["--spectral_warmup_steps", "3", "--max_steps", "4"]).spectral_warmup_steps == 3


def test_warmup_longer_than_the_epochs_is_refused(tiny_clip_dir, tmp_path):
    # 16 examples, batch 4, 1 epoch: 4 optimizer steps, known only once the data is loaded
    with pytest.raises(ValueError, match="--spectral_warmup_steps 4 must be below the run's 4 optimizer steps"):
        train(tiny_clip_dir, tmp_path, "--num_epochs", "1", "--batch_size", "4", "--spectral_warmup_steps", "4",
              "--freeze_rule", "median")
    assert not (tmp_path / "model").exists()


def test_switch_refused_where_the_model_cannot_be_rewrapped():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from opentrans_hf.training.warmup import check_switch_supported

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_switch_supported(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ValueError, match=f"which {kind.name} does not support"):
            check_switch_supported(SimpleNamespace(distributed_type=kind))


def test_warmup_with_measured_alphas_is_an_argument_error(tmp_path):
    done = tmp_path / "done.json"
    done.write_text(json.dumps({"freeze_rule": "median", "layer_alphas": {"a": 2.0, "b": 3.0}}))
    with pytest.raises(ArgumentError, match="already has layer_alphas"):
        parse_args("train", ["--spectral_warmup_steps", "2", "--spectral_config", str(done)])
    fresh = tmp_path / "fresh.json"
    fresh.write_text(json.dumps({"freeze_rule": "ratio", "freeze_ratio": 0.25}))
    assert parse_args("train", ["--spectral_warmup_steps", "2", "--spectral_config", str(fresh)]).spectral_config


def _framework_weights(tiny_clip_dir, state: dict, prefix: str = ""):
    """A framework built as the run builds it, with the weights of ``state`` (keys after ``prefix``)."""
    model = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, image_size=30, seen_class_names=["a", "b"])
    own = model.state_dict()
    model.load_state_dict({k: state.get(prefix + k, own[k]) for k in own}, strict=False)
    return model


@pytest.mark.slow
def test_alpha_after_warmup_freezes_then_resumes_identically(tiny_clip_dir, tmp_path):
    a = tmp_path / "a"
    metrics = train(tiny_clip_dir, a, *RUN)
    switch = metrics["spectral_switch"]
    history = json.loads((a / "history.json").read_text())
    assert history["spectral_switch"] == switch and switch["step"] == 2 and len(history["loss"]) == 4
    # the adapter holds the alphas measured at the switch and the rule's split of them
    cfg = SpectralTuningConfig.from_pretrained(a / "model" / "spectral_adapter")
    assert cfg.layer_alphas == switch["layer_alphas"] and cfg.trainable_layers == switch["trainable_layers"]
    assert switch["frozen_layers"] and set(switch["frozen_layers"]).isdisjoint(cfg.trainable_layers)
    # alpha was measured on the weights of step 2 (the checkpoint written just after the switch) ...
    at_switch = load_file(a / "step_2" / "model.safetensors")
    model = _framework_weights(tiny_clip_dir, at_switch, prefix="base_model.")
    measured = analyze_spectra(model, target_modules=model.encoder_target_modules()).alphas
    assert sorted(measured.values()) == pytest.approx(sorted(switch["layer_alphas"].values()), rel=1e-9)
    # ... not on the starting weights (the alpha* of a run without warm-up)
    start = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, image_size=30, seen_class_names=["a", "b"])
    start_alphas = analyze_spectra(start, target_modules=start.encoder_target_modules()).alphas
    assert start_alphas.keys() == measured.keys() and start_alphas != measured
    # the frozen layers trained during the warm-up and not after it; the others trained on
    final = load_file(a / "model" / "model.safetensors")
    before = start.state_dict()
    key = lambda layer: next(k for k in (f"clip.vision_model.{layer}.weight", f"{layer}.weight") if k in before)
    for layer in switch["frozen_layers"]:
        w = key(layer)
        assert not torch.equal(before[w], at_switch["base_model." + w]), f"{layer} did not train in the warm-up"
        assert torch.equal(at_switch["base_model." + w], final[w]), f"{layer} trained after the switch"
    assert any(not torch.equal(at_switch["base_model." + key(l)], final[key(l)]) for l in cfg.trainable_layers)
    # the model card says when alpha was measured and lists the alphas and the frozen layers
    card = (a / "model" / "README.md").read_text()
    assert "alpha measured at step 2, after a warm-up" in card
    assert f"| {switch['frozen_layers'][0]} | {switch['layer_alphas'][switch['frozen_layers'][0]]:.3f} | frozen |" in card
    assert "Alpha measured after 2 warm-up steps" in (a / "model" / "spectral_adapter" / "README.md").read_text()
    checkpoint = json.loads((a / "step_2" / "checkpoint.json").read_text())
    assert checkpoint["fingerprint"]["spectral_warmup_steps"] == 2
    assert checkpoint["spectral_config"]["trainable_layers"] == cfg.trainable_layers
    assert "spectral_config" not in json.loads((a / "step_1" / "checkpoint.json").read_text())

    # interrupted before the switch (step 1) and after it (step 3): both resume to the same end
    for ckpt in ("step_1", "step_3"):
        b = tmp_path / f"from-{ckpt}"
        shutil.copytree(a / ckpt, b / ckpt)
        resumed = train(tiny_clip_dir, b, *RUN, "--resume_from_checkpoint", "latest")
        assert resumed["spectral_switch"] == switch and resumed["final_train_loss"] == metrics["final_train_loss"]
        other = load_file(b / "model" / "model.safetensors")
        assert other.keys() == final.keys()
        for k in final:
            assert torch.equal(final[k], other[k]), f"{ckpt}: {k}"
        assert SpectralTuningConfig.from_pretrained(b / "model" / "spectral_adapter").trainable_layers == cfg.trainable_layers

    # another warm-up length is another run: its checkpoints are not resumed
    c = tmp_path / "other-warmup"
    shutil.copytree(a / "step_1", c / "step_1")
    with pytest.raises(CheckpointMismatch, match="spectral_warmup_steps: 2 in the checkpoint, 3 now"):
        train(tiny_clip_dir, c, *RUN, "--spectral_warmup_steps", "3", "--resume_from_checkpoint", "latest")


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate fixes mixed precision once per process: start and leave this test with a fresh state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_warmup_with_bf16_mixed_precision(tiny_clip_dir, tmp_path, fresh_accelerate_state):
    metrics = train(tiny_clip_dir, tmp_path, "--max_steps", "2", "--spectral_warmup_steps", "1",
                    "--freeze_rule", "ratio", "--mixed_precision", "bf16", "--batch_size", "4")
    assert metrics["steps"] == 2 and metrics["spectral_switch"]["step"] == 1 and metrics["spectral_switch"]["frozen_layers"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_agree_on_the_frozen_set(tiny_clip_dir, tmp_path):
    script = HELPERS / "ddp_spectral_warmup.py"
    res = launch_two_processes(script, tiny_clip_dir, tmp_path, port=29617)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    switches = [r["metrics"]["spectral_switch"] for r in ranks]
    assert switches[0] == switches[1] and switches[0]["step"] == 1 and switches[0]["frozen_layers"]
    # training went on after the switch, in step on both ranks
    assert [r["metrics"]["steps"] for r in ranks] == [3, 3]
    assert ranks[0]["metrics"]["final_train_loss"] == ranks[1]["metrics"]["final_train_loss"]
    assert len(json.loads((tmp_path / "a" / "history.json").read_text())["loss"]) == 3
    # resumed from the checkpoint after the switch: the frozen set is restored, the end is the same
    assert [r["resumed"]["spectral_switch"] for r in ranks] == switches
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = SpectralTuningConfig.from_pretrained(tmp_path / "a" / "model" / "spectral_adapter")
    assert cfg.trainable_layers == switches[0]["trainable_layers"]
