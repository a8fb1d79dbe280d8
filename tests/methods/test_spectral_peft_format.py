"""A spectral adapter is a PEFT adapter: the directory ``SpectralModel.save_pretrained`` writes (and the
train job's ``spectral_adapter/``) loads with plain ``peft.PeftModel.from_pretrained``, with the
SpectralModel's outputs, and ``merge_and_unload()`` gives the tuned base model; ``peft``'s
state-dict functions work on a SpectralModel; adapters of 0.2 still load."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import SpectralModel, SpectralTuningConfig, get_spectral_model
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.methods.spectral_tuning import read_spectral_adapter
from opentrans_hf.models import FRAMEWORKS

FIXTURE = Path(__file__).parent / "fixtures" / "spectral_adapter_v0.2"
SMALL_M2F = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64,
                 decoder_layers=2, train_num_points=128)
CLASSES = ["sky", "grass", "road"]

# Runs in a fresh interpreter with only torch, transformers, peft and safetensors: the base model is
# built as a user builds it, the adapter loaded by PEFT alone.
PLAIN_PEFT = textwrap.dedent('''
    import sys
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPVisionModel

    kind, clip_dir, adapter, expected, tuned = sys.argv[1:6]
    cls = {"CLIPModel": CLIPModel, "CLIPVisionModel": CLIPVisionModel}[kind]
    ref = load_file(expected)

    def outputs(model):
        with torch.no_grad():
            if kind == "CLIPModel":
                out = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"])
                return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten(), out.logits_per_image.flatten()])
            out = model(pixel_values=ref["pixel_values"])
            return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    base = cls.from_pretrained(clip_dir).eval()
    assert not torch.allclose(outputs(base), ref["outputs"]), "the untuned base already gives the tuned outputs"
    assert PeftConfig.from_pretrained(adapter).peft_type == "LN_TUNING"
    model = PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(outputs(model), ref["outputs"])
    merged = model.merge_and_unload()
    assert type(merged) is cls and not [n for n, _ in merged.named_modules() if "ln_tuning" in n]
    torch.testing.assert_close(outputs(merged.eval()), ref["outputs"])
    state, tuned = merged.state_dict(), load_file(tuned)
    assert set(state) == set(tuned), sorted(set(state) ^ set(tuned))[:5]
    for name, t in tuned.items():
        assert torch.equal(state[name], t), name
    assert "opentrans_hf" not in sys.modules, "opentrans_hf was imported"
    print("plain PEFT: ok")
''')


def perturb_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Stand-in for training: every trainable tensor moves, so a tensor PEFT failed to load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def clip_outputs(kind: str, model, pixel_values, input_ids=None) -> torch.Tensor:
    with torch.no_grad():
        if kind == "CLIPModel":
            out = model(pixel_values=pixel_values, input_ids=input_ids)
            return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten(), out.logits_per_image.flatten()])
        out = model(pixel_values=pixel_values)
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPModel"])
def test_plain_peft_in_a_fresh_interpreter_loads_the_adapter(kind, tiny_clip_dir, tmp_path):
    cls = {"CLIPModel": CLIPModel, "CLIPVisionModel": CLIPVisionModel}[kind]
    base = cls.from_pretrained(tiny_clip_dir)
    spectral = get_spectral_model(base, SpectralTuningConfig())  # the default config, as a user calls it
    perturb_trainable(base)
    adapter = spectral.save_pretrained(tmp_path / "adapter")
    g = torch.Generator().manual_seed(1)
    pixel_values, input_ids = torch.randn(2, 3, 30, 30, generator=g), torch.tensor([[1, 5, 7, 2], [1, 9, 3, 2]])
    spectral.eval()
    save_file({"pixel_values": pixel_values, "input_ids": input_ids,
               "outputs": clip_outputs(kind, spectral, pixel_values, input_ids)}, str(tmp_path / "expected.safetensors"))
    save_file({n: t.contiguous() for n, t in base.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    done = subprocess.run([sys.executable, "-c", PLAIN_PEFT, kind, str(tiny_clip_dir), str(adapter),
                           str(tmp_path / "expected.safetensors"), str(tmp_path / "tuned.safetensors")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain PEFT: ok" in done.stdout


def test_the_format_on_disk(tiny_clip_dir, tmp_path):
    """PEFT's LN_TUNING config and keys; the spectral config and the stored tensors in the entry PEFT ignores."""
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    spectral = get_spectral_model(base, SpectralTuningConfig())
    d = spectral.save_pretrained(tmp_path / "adapter")
    data = json.loads((d / "adapter_config.json").read_text())
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert data["peft_type"] == "LN_TUNING" and data["spectral_tuning"]["format_version"] == 2
    assert set(data["spectral_tuning"]["tensors"]) == trainable  # no buffer in these layers
    assert set(data["target_modules"]) == {m for m in spectral.trainable_layers} | {
        n for n, m in base.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    keys = set(load_file(str(d / "adapter_model.safetensors")))
    fc1 = next(t for t in data["target_modules"] if t.endswith("mlp.fc1"))
    assert {f"base_model.model.{fc1}.ln_tuning_layers.weight", f"base_model.model.{fc1}.ln_tuning_layers.bias"} <= keys
    # what is no Linear/Conv/norm layer of its own is stored directly, under the base model's name
    assert {"base_model.model.embeddings.class_embedding", "base_model.model.embeddings.position_embedding.weight"} <= keys
    assert len(keys) == len(trainable)
    cfg = SpectralTuningConfig.from_pretrained(d)  # our reader: the analysis, no re-analysis needed
    assert cfg.layer_alphas == spectral.spectral_config.layer_alphas and cfg.trainable_layers == spectral.trainable_layers
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['spectral_tuning'\]"):
        assert PeftConfig.from_pretrained(d).target_modules == data["target_modules"]


def test_an_adapter_with_no_layer_to_copy_warns_that_plain_peft_cannot_load_it(tiny_clip_dir, tmp_path, capsys):
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    spectral = get_spectral_model(base, SpectralTuningConfig(freeze_rule="top_k", k=0, train_norms=False))
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        "embeddings.class_embedding", "embeddings.position_embedding.weight"}
    capsys.readouterr()
    d = spectral.save_pretrained(tmp_path / "adapter")
    assert "plain PEFT cannot load this adapter" in capsys.readouterr().err
    loaded = SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d)
    assert torch.equal(loaded.base_model.embeddings.class_embedding, base.embeddings.class_embedding)


def test_what_plain_peft_keeps_in_memory(tiny_clip_dir, tmp_path):
    """LN_TUNING keeps a copy of each target layer beside the original: the extra memory is exactly the
    targets' tensors (the numbers docs/spectral-tuning.md gives for the tiny CLIP)."""
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    spectral = get_spectral_model(base, SpectralTuningConfig())
    d = spectral.save_pretrained(tmp_path / "adapter")
    layout = spectral.adapter_layout()
    params = dict(base.named_parameters())
    copied = sum(params[n].numel() for n in layout.tensors if layout.target_of(n) is not None)
    total = sum(p.numel() for p in base.parameters())
    loaded = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d)
    assert sum(p.numel() for p in loaded.parameters()) == total + copied
    assert sum(p.numel() for p in loaded.merge_and_unload().parameters()) == total
    assert 0 < copied < total and (copied, total) == (8426, 21354)  # the tiny CLIP's vision tower


@pytest.mark.parametrize("framework", ["deeplabv3", "mask2former"])
def test_plain_peft_loads_a_framework_adapter(framework, tiny_clip_dir, tmp_path):
    """The framework's head trains too; Mask2Former's head calls some layers through Python lists and has an
    nn.MultiheadAttention (which reads its out_proj's weight): those are stored directly, not as copies."""
    overrides = {"deeplabv3": dict(aspp_channels=16), "mask2former": SMALL_M2F}[framework]
    model = FRAMEWORKS[framework].from_clip(tiny_clip_dir, **overrides)
    spectral = get_spectral_model(model, SpectralTuningConfig())
    perturb_trainable(model)
    d = spectral.save_pretrained(tmp_path / "adapter")
    x = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(2))

    def logits(m):
        with torch.no_grad():
            return m.eval()(pixel_values=x, class_names=CLASSES).logits

    expected = logits(spectral)
    base = FRAMEWORKS[framework].from_clip(tiny_clip_dir, **overrides)
    assert not torch.allclose(logits(base), expected)
    peft_model = PeftModel.from_pretrained(base, d)
    torch.testing.assert_close(logits(peft_model), expected)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected)
    for name, t in model.state_dict().items():
        assert torch.equal(merged.state_dict()[name], t), name


@pytest.fixture(scope="module")
def trained_run(tiny_clip_dir, tmp_path_factory):
    """A finished train job (DeepLabV3 on the embedded data, spectral tuning with the median rule)."""
    out = tmp_path_factory.mktemp("run") / "run"
    metrics = run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
        "--embedded_size", "16", "--max_eval_examples", "4", "--learning_rate", "1e-2", "--max_steps", "2",
        "--freeze_rule", "median"]))
    return out, metrics


def test_the_train_jobs_adapter_loads_with_plain_peft(trained_run, tiny_clip_dir):
    out, metrics = trained_run
    adapter = out / "model" / "spectral_adapter"
    _, tensors = read_spectral_adapter(adapter)
    assert "aspp.branches.0.0.weight" in tensors  # the head trained, and its tensors are in the adapter
    trained = FRAMEWORKS["deeplabv3"].from_pretrained(out / "model").eval()
    base = FRAMEWORKS["deeplabv3"].from_clip(tiny_clip_dir, image_size=30, seen_class_names=metrics["train_classes"])
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))

    def logits(m):
        with torch.no_grad():
            return m.eval()(pixel_values=x, class_names=CLASSES).logits

    expected = logits(trained)
    assert not torch.allclose(logits(base), expected)
    peft_model = PeftModel.from_pretrained(base, adapter)  # the model class is ours, the adapter load is PEFT's
    torch.testing.assert_close(logits(peft_model), expected)
    torch.testing.assert_close(logits(peft_model.merge_and_unload()), expected)


def test_peft_state_dict_functions_work_on_a_spectral_model(tiny_clip_dir, tmp_path):
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    spectral = get_spectral_model(base, SpectralTuningConfig())
    perturb_trainable(base)
    d = spectral.save_pretrained(tmp_path / "adapter")
    state = get_peft_model_state_dict(spectral)
    on_disk = load_file(str(d / "adapter_model.safetensors"))
    assert set(state) == set(on_disk) and all(torch.equal(state[k], on_disk[k]) for k in on_disk)
    # the same keys as PEFT's own model of the saved adapter gives
    peft_model = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d)
    assert set(get_peft_model_state_dict(peft_model)) == set(state) - {
        k for k in state if ".ln_tuning_layers." not in k}  # PEFT's save leaves out the directly stored ones
    # set_peft_model_state_dict loads them into another SpectralModel of the same config
    fresh = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    other = get_spectral_model(fresh, SpectralTuningConfig.from_pretrained(d))
    result = set_peft_model_state_dict(other, state)
    assert result.unexpected_keys == []
    for name, t in base.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    # a SpectralModel loaded for inference (nothing trainable) gives the adapter it loaded
    inference = SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d)
    assert not any(p.requires_grad for p in inference.parameters())
    again = get_peft_model_state_dict(inference)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    result = set_peft_model_state_dict(other, {"base_model.model.no.such.tensor": torch.zeros(1)})
    assert result.unexpected_keys == ["no.such.tensor"]  # PEFT drops its prefix on a model without it


def test_an_adapter_saved_by_version_0_2_still_loads(tiny_clip_dir, tmp_path):
    """``fixtures/spectral_adapter_v0.2``: written by opentrans-hf 0.2 (peft_type SPECTRAL_TUNING, tensors
    under the model's names) on this tiny CLIP with the default config and "trained" tensors."""
    data = json.loads((FIXTURE / "adapter_config.json").read_text())
    assert data["peft_type"] == "SPECTRAL_TUNING" and data["library_version"] == "0.2.0"
    stored = load_file(str(FIXTURE / "adapter_model.safetensors"))
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    loaded = SpectralModel.from_pretrained(base, FIXTURE, is_trainable=True)
    params = dict(base.named_parameters())
    for name, t in stored.items():
        assert torch.equal(params[name], t), name
    assert {n for n, p in params.items() if p.requires_grad} == set(stored)
    assert loaded.spectral_config.layer_alphas == data["layer_alphas"]
    # saved again, it is in this version's format, which plain PEFT loads
    d = loaded.save_pretrained(tmp_path / "again")
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    peft_model = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d).merge_and_unload()
    for name, t in base.state_dict().items():
        assert torch.equal(peft_model.state_dict()[name], t), name
    shutil.copytree(FIXTURE, tmp_path / "copy")
    assert SpectralTuningConfig.from_pretrained(tmp_path / "copy").trainable_layers == data["trainable_layers"]
