"""A spectral tuning config transfers like a sparse mask: layer names relative to the CLIP vision tower,
the vision encoder as the default target (the text tower neither analysed nor trained), and layers
without a valid alpha decided by ``invalid_alpha`` and listed."""

import json

import pytest
import torch
from safetensors.torch import load_file
from spectral_formats import to_previous_format
from torch import nn
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import SpectralModel, SpectralTuningConfig, get_spectral_model
from opentrans_hf.models import FRAMEWORKS
from opentrans_hf.utils.naming import canonical_name

SMALL_M2F = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64,
                 decoder_layers=2, train_num_points=128)
# FC-CLIP freezes its CLIP encoder by default (nothing for spectral tuning to train there, see
# test_fcclip_frozen_encoder_stays_frozen_under_spectral_tuning); these transfer tests tune it
OVERRIDES = {"deeplabv3": dict(aspp_channels=16), "mask2former": SMALL_M2F,
             "fcclip": dict(SMALL_M2F, freeze_clip_encoder=False)}
HOSTS = ["CLIPVisionModel", "CLIPModel", *FRAMEWORKS]  # deeplabv3, mask2former, fcclip


def make_host(name, clip_dir):
    if name == "CLIPVisionModel":
        return CLIPVisionModel.from_pretrained(clip_dir)
    if name == "CLIPModel":
        return CLIPModel.from_pretrained(clip_dir)
    return FRAMEWORKS[name].from_clip(clip_dir, **OVERRIDES[name])


@pytest.fixture(scope="module")
def hosts(tiny_clip_dir):
    return {name: make_host(name, tiny_clip_dir) for name in HOSTS}


def reload(cfg: SpectralTuningConfig) -> SpectralTuningConfig:
    """Through JSON, as a saved adapter_config.json or a --spectral_config file."""
    return SpectralTuningConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))


def frozen_and_trained(model: nn.Module, spectral: SpectralModel) -> tuple[set[str], set[str]]:
    """The analysed layers, relative to the vision tower, whose weights are frozen / trainable on ``model``."""
    modules = dict(model.named_modules())
    frozen = {canonical_name(m) for m in spectral.analysed_layers if not modules[m].weight.requires_grad}
    trained = {canonical_name(m) for m in spectral.analysed_layers if modules[m].weight.requires_grad}
    return frozen, trained


def test_one_config_freezes_the_same_encoder_layers_on_all_five_hosts(hosts):
    made = {}
    for name, model in hosts.items():
        cfg = SpectralTuningConfig()
        get_spectral_model(model, cfg)
        made[name] = cfg
    reference = made["CLIPVisionModel"]
    assert reference.trainable_layers and len(reference.trainable_layers) < len(reference.layer_alphas)
    assert all(n.startswith(("encoder.layers.", "embeddings.")) for n in reference.layer_alphas)
    for name, cfg in made.items():  # stored relative to the vision tower, whatever the host
        assert list(cfg.layer_alphas) == list(reference.layer_alphas), name
        assert cfg.layer_alphas == pytest.approx(reference.layer_alphas), name
        assert cfg.trainable_layers == reference.trainable_layers, name
    expected_frozen = set(reference.layer_alphas) - set(reference.trainable_layers)
    for source, cfg in made.items():
        for target, model in hosts.items():
            spectral = get_spectral_model(model, reload(cfg))
            frozen, trained = frozen_and_trained(model, spectral)
            assert frozen == expected_frozen, f"config made on {source}, applied to {target}"
            assert trained == set(reference.trainable_layers), f"config made on {source}, applied to {target}"
            assert {canonical_name(m) for m in spectral.frozen_layers} == expected_frozen
            assert all(m in dict(model.named_modules()) for m in spectral.analysed_layers)  # the host's own names


@pytest.mark.parametrize("prefix", ["vision_model.", "clip.vision_model."])
def test_configs_of_the_previous_version_load_and_apply(prefix, hosts, tmp_path):
    cfg = SpectralTuningConfig()
    get_spectral_model(hosts["CLIPVisionModel"], cfg)
    expected_frozen = set(cfg.layer_alphas) - set(cfg.trainable_layers)
    old = cfg.to_dict()  # as the previous version wrote it: the host's own names
    old["layer_alphas"] = {prefix + n: a for n, a in cfg.layer_alphas.items()}
    old["trainable_layers"] = [prefix + n for n in cfg.trainable_layers]
    for field in ("invalid_alpha", "invalid_layers"):  # fields the previous version did not have
        old.pop(field, None)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(old))
    for target, model in hosts.items():
        spectral = get_spectral_model(model, SpectralTuningConfig.from_pretrained(path))
        assert frozen_and_trained(model, spectral)[0] == expected_frozen, target
    loaded = SpectralTuningConfig.from_pretrained(path)
    assert loaded.layer_alphas == cfg.layer_alphas and loaded.trainable_layers == cfg.trainable_layers  # canonical


def test_adapter_saved_by_the_previous_version_loads(tiny_clip_dir, tmp_path):
    base = CLIPModel.from_pretrained(tiny_clip_dir)
    model = get_spectral_model(base, SpectralTuningConfig())
    d = model.save_pretrained(tmp_path / "adapter")
    assert all(n.startswith("encoder.") for n in  # transferable names on disk
               json.loads((d / "adapter_config.json").read_text())["spectral_tuning"]["config"]["trainable_layers"])
    to_previous_format(d)  # the format of 0.2 (peft_type SPECTRAL_TUNING), with the names of the version before
    saved = json.loads((d / "adapter_config.json").read_text())
    saved["layer_alphas"] = {"vision_model." + n: a for n, a in saved["layer_alphas"].items()}
    saved["trainable_layers"] = ["vision_model." + n for n in saved["trainable_layers"]]
    (d / "adapter_config.json").write_text(json.dumps(saved))
    loaded = SpectralModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), d, is_trainable=True)
    assert loaded.trainable_layers == model.trainable_layers
    assert all(n.startswith("vision_model.encoder.layers.") for n in loaded.trainable_layers)
    assert loaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_default_targets_never_the_text_tower(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    text = [p for n, p in clip.named_parameters() if n.startswith("text_model.")]
    for i, p in enumerate(text):  # whatever requires_grad the text tower had, the default freezes it
        p.requires_grad_(i % 2 == 0)
    spectral = get_spectral_model(clip, SpectralTuningConfig())
    assert not any(p.requires_grad for p in text)
    assert not any(p.requires_grad for p in (clip.logit_scale, clip.text_projection.weight, clip.visual_projection.weight))
    assert spectral.analysed_layers and all(n.startswith("vision_model.") for n in spectral.analysed_layers)
    spectral.unload()  # gives the user's choice back
    assert [p.requires_grad for p in text] == [i % 2 == 0 for i in range(len(text))]
    # a user who targets the text tower gets it
    targeted = get_spectral_model(CLIPModel.from_pretrained(tiny_clip_dir),
                                  SpectralTuningConfig(target_modules=r"text_model\.encoder\.layers\.\d+\..*"))
    assert all(n.startswith("text_model.") for n in targeted.analysed_layers)
    assert all(n.startswith("text_model.") for n in targeted.spectral_config.layer_alphas)  # host-relative


def test_train_with_a_config_without_target_modules_leaves_the_text_tower_frozen(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import parse_args
    from opentrans_hf.commands.train import run as run_training

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"freeze_rule": "median"}))
    out = tmp_path / "run"
    run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
        "--embedded_size", "8", "--max_eval_examples", "2", "--max_steps", "1", "--spectral_config", str(cfg),
    ]))
    adapter = out / "model" / "spectral_adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))  # every trainable parameter
    assert tensors and not [n for n in tensors if "text_model." in n or "text_projection" in n]
    saved = SpectralTuningConfig.from_pretrained(adapter)
    assert all(n.startswith(("encoder.layers.", "embeddings.")) for n in saved.layer_alphas)
    # the same share as the framework's own default (target_modules=encoder_target_modules())
    framework = make_host("deeplabv3", tiny_clip_dir)
    explicit = get_spectral_model(framework, SpectralTuningConfig(target_modules=framework.encoder_target_modules()))
    assert explicit.spectral_config.layer_alphas.keys() == saved.layer_alphas.keys()


def _break(layer: nn.Linear, how: str) -> None:
    with torch.no_grad():
        if how == "zero":
            layer.weight.zero_()
        else:
            layer.weight[0, 0] = float("nan")


@pytest.mark.parametrize("how,status", [("zero", "degenerate"), ("nan", "invalid")])
def test_invalid_alpha_train_is_the_default_and_listed(how, status, tiny_clip_dir, tmp_path, capsys):
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    fc1 = vision.encoder.layers[0].mlp.fc1
    _break(fc1, how)
    fc1.requires_grad_(False)
    cfg = SpectralTuningConfig()
    assert cfg.invalid_alpha == "train"
    spectral = get_spectral_model(vision, cfg)
    assert list(cfg.invalid_layers) == ["encoder.layers.0.mlp.fc1"]
    assert cfg.invalid_layers["encoder.layers.0.mlp.fc1"].startswith(status)
    assert "encoder.layers.0.mlp.fc1" not in cfg.layer_alphas and "encoder.layers.0.mlp.fc1" in cfg.trainable_layers
    assert fc1.weight.requires_grad and "encoder.layers.0.mlp.fc1" in spectral.analysed_layers
    spectral.print_trainable_parameters()
    out = capsys.readouterr().out
    assert "1 analysed layer(s) without a valid alpha (invalid_alpha='train')" in out
    assert f"encoder.layers.0.mlp.fc1: trained ({status}" in out
    # the decision travels with the config and the adapter
    again = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    get_spectral_model(again, reload(cfg))
    assert again.encoder.layers[0].mlp.fc1.weight.requires_grad
    if how == "nan":
        return  # an adapter holding NaN weights is refused on load (tests/test_adapter_validation.py)
    d = spectral.save_pretrained(tmp_path / "a")
    saved = json.loads((d / "adapter_config.json").read_text())["spectral_tuning"]["config"]
    assert saved["invalid_layers"] == cfg.invalid_layers
    card = (d / "README.md").read_text()
    assert 'Layers without a valid alpha (1, `invalid_alpha="train"`: fine-tuned): `encoder.layers.0.mlp.fc1` (degenerate' in card
    loaded = SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d, is_trainable=True)
    assert loaded.invalid_layers == {"encoder.layers.0.mlp.fc1": cfg.invalid_layers["encoder.layers.0.mlp.fc1"]}


def test_invalid_alpha_freeze_and_error(tiny_clip_dir, capsys):
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    fc1 = vision.encoder.layers[0].mlp.fc1
    _break(fc1, "zero")
    cfg = SpectralTuningConfig(invalid_alpha="freeze")
    spectral = get_spectral_model(vision, cfg)
    assert not fc1.weight.requires_grad and not fc1.bias.requires_grad
    assert "encoder.layers.0.mlp.fc1" in spectral.frozen_layers and "encoder.layers.0.mlp.fc1" not in cfg.trainable_layers
    spectral.print_trainable_parameters()
    assert "encoder.layers.0.mlp.fc1: frozen (degenerate: all-zero weight matrix" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"1 layer\(s\) of CLIPVisionModel have no valid alpha \(invalid_alpha='error'\): "
                                         r"encoder\.layers\.0\.mlp\.fc1: degenerate: all-zero"):
        get_spectral_model(vision, SpectralTuningConfig(invalid_alpha="error"))
    with pytest.raises(ValueError, match=r"unknown invalid_alpha 'skip'"):
        SpectralTuningConfig(invalid_alpha="skip")
    with pytest.raises(ValueError, match=r"invalid_layers must be a mapping"):
        SpectralTuningConfig(invalid_layers={"fc": 3})


def test_a_transferred_config_keeps_encoder_layers_no_head_reads_frozen(tiny_clip_dir):
    cfg = SpectralTuningConfig(freeze_rule="top_k", k=100)  # trains every analysed layer of CLIPModel, layer 1 too
    get_spectral_model(CLIPModel.from_pretrained(tiny_clip_dir), cfg)
    assert "encoder.layers.1.mlp.fc1" in cfg.trainable_layers
    model = FRAMEWORKS["deeplabv3"].from_clip(tiny_clip_dir, feature_layers=[1, 1, 1, 1], **OVERRIDES["deeplabv3"])
    spectral = get_spectral_model(model, reload(cfg))
    assert not any(p.requires_grad for p in model.clip.vision_model.encoder.layers[1].parameters())
    assert model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.requires_grad
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 30, 30, generator=g), torch.randint(0, 2, (2, 30, 30), generator=g)
    spectral(pixel_values=x, labels=y, class_names=["sky", "grass"]).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # DDP-safe


@pytest.mark.parametrize("source", ["CLIPVisionModel", "CLIPModel"])
def test_a_default_adapter_saved_on_a_clip_loads_into_every_host(source, tiny_clip_dir, tmp_path):
    base = make_host(source, tiny_clip_dir)
    spectral = get_spectral_model(base, SpectralTuningConfig())  # the default config, as a user calls it
    with torch.no_grad():  # "trained" weights, to see them arrive
        for n, p in base.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    d = spectral.save_pretrained(tmp_path / "adapter")
    trained = {canonical_name(n): p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    assert trained and not [n for n in trained if n.startswith(("text_model.", "text_projection", "visual_projection",
                                                                "logit_scale"))]
    frozen = {canonical_name(m) for m in spectral.frozen_layers}
    for target in HOSTS:
        model = make_host(target, tiny_clip_dir)
        loaded = SpectralModel.from_pretrained(model, d, is_trainable=True)
        assert frozen_and_trained(model, loaded)[0] == frozen, target
        params = dict(model.named_parameters())
        prefix = {"CLIPVisionModel": "", "CLIPModel": "vision_model."}.get(target, "clip.vision_model.")
        for n, t in trained.items():
            assert torch.equal(params[prefix + n], t), (target, n)
    with pytest.raises(ValueError, match=r"holds tensors CLIPVisionModel does not have: .*aspp"):
        framework = make_host("deeplabv3", tiny_clip_dir)
        get_spectral_model(framework, SpectralTuningConfig()).save_pretrained(tmp_path / "framework")
        SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), tmp_path / "framework")


def test_fcclip_frozen_encoder_stays_frozen_under_spectral_tuning(tiny_clip_dir):
    """FC-CLIP's default (freeze_clip_encoder=True) wins over a spectral config: no encoder layer trains."""
    model = FRAMEWORKS["fcclip"].from_clip(tiny_clip_dir, **SMALL_M2F)
    spectral = get_spectral_model(model, SpectralTuningConfig())
    assert spectral.spectral_config.trainable_layers  # the config says what it would train
    assert not any(p.requires_grad for p in model.clip.vision_model.parameters())
    assert any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("clip."))
