"""SpectralTuningConfig / get_spectral_model / SpectralModel."""

import json
import statistics
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import SpectralModel, SpectralTuningConfig, analyze_spectra, get_spectral_model
from opentrans_hf.methods.spectral_tuning import (
    block_of,
    estimate_training_flops,
    find_unused_parameters,
    freeze_unused_parameters,
    spectral_param_groups,
)

VISION = r"encoder\.layers\.\d+\..*"
VISION_IN_CLIP = r"vision_model\.encoder\.layers\.\d+\..*"


@pytest.fixture
def vision(tiny_clip_dir):
    return CLIPVisionModel.from_pretrained(tiny_clip_dir)


def test_median_rule_freezes_exactly_below_median(vision):
    report = analyze_spectra(vision, target_modules=VISION)
    med = statistics.median(report.alphas.values())
    expected_frozen = {n for n, a in report.alphas.items() if a < med}
    cfg = SpectralTuningConfig(target_modules=VISION)
    model = get_spectral_model(vision, cfg)
    assert set(model.frozen_layers) == expected_frozen
    assert set(model.trainable_layers) == set(report.alphas) - expected_frozen
    assert cfg.layer_alphas == report.alphas  # the config states what was measured
    modules = dict(vision.named_modules())
    for name in report.alphas:
        trainable = name not in expected_frozen
        assert modules[name].weight.requires_grad is trainable, name
        assert modules[name].bias.requires_grad is trainable, name  # train_biases=False
    # everything not analysed stays trainable (norms, embeddings), as in the paper
    assert vision.post_layernorm.weight.requires_grad and vision.encoder.layers[0].layer_norm1.weight.requires_grad
    assert vision.embeddings.patch_embedding.weight.requires_grad
    assert isinstance(model, nn.Module) and model.config is vision.config  # attributes forward to the base model


def test_other_rules_and_block_granularity(vision):
    alphas = analyze_spectra(vision, target_modules=VISION).alphas
    order = sorted(alphas, key=alphas.get)
    m = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION, freeze_rule="ratio", freeze_ratio=0.25))
    assert set(m.frozen_layers) == set(order[: int(0.25 * len(order))])
    m = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION, freeze_rule="top_k", k=2))
    assert set(m.trainable_layers) == set(order[-2:])
    thr = alphas[order[3]]
    m = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION, freeze_rule="threshold", alpha_threshold=thr))
    assert set(m.frozen_layers) == set(order[:3])
    m = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION, granularity="block"))
    block_alpha = {b: statistics.fmean(a for n, a in alphas.items() if block_of(n) == b) for b in {block_of(n) for n in alphas}}
    frozen_blocks = {b for b, a in block_alpha.items() if a < statistics.median(block_alpha.values())}
    assert len(block_alpha) == 2 and len(frozen_blocks) == 1
    assert set(m.frozen_layers) == {n for n in alphas if block_of(n) in frozen_blocks}
    assert block_of("vision_model.encoder.layers.3.mlp.fc1") == "vision_model.encoder.layers.3"
    assert block_of("layer2.1.conv1") == "layer2.1" and block_of("embeddings.patch_embedding") == "embeddings.patch_embedding"


def test_clipmodel_names_with_target_modules(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = get_spectral_model(clip, SpectralTuningConfig(target_modules=VISION_IN_CLIP))
    assert model.analysed_layers and all(n.startswith("vision_model.encoder.layers.") for n in model.analysed_layers)
    # the text tower is not targeted, so it is frozen (tests/methods/test_text_tower.py)
    assert not any(p.requires_grad for n, p in clip.named_parameters() if not n.startswith("vision_model."))
    assert any(not p.requires_grad for n, p in clip.named_parameters() if n.startswith("vision_model."))


def test_save_load_round_trip_identical_outputs(tmp_path, tiny_clip_dir):
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    model = get_spectral_model(base, SpectralTuningConfig(target_modules=VISION, modules_to_save=["post_layernorm"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 30, 30)
    frozen_before = {n: p.clone() for n, p in base.named_parameters() if not p.requires_grad}
    for _ in range(3):
        loss = model(pixel_values=x).pooler_output.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in base.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    model.save_pretrained(tmp_path / "adapter")
    # the adapter holds exactly the trainable tensors, under PEFT LN_TUNING's keys (see test_spectral_peft_format)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert set(cfg["spectral_tuning"]["tensors"]) == trainable and len(saved) == len(trainable)
    assert all(k.startswith("base_model.model.") for k in saved)
    assert not any(k.removeprefix("base_model.model.").replace(".ln_tuning_layers", "") in frozen_before for k in saved)
    assert cfg["peft_type"] == "LN_TUNING" and cfg["spectral_tuning"]["config"]["trainable_layers"] == model.trainable_layers
    assert "Spectral tuning adapter" in (tmp_path / "adapter" / "README.md").read_text()

    fresh = CLIPVisionModel.from_pretrained(tiny_clip_dir)  # untrained weights
    with mock.patch("opentrans_hf.methods.spectral_tuning.model.analyze_spectra", side_effect=AssertionError("re-analysed")):
        loaded = SpectralModel.from_pretrained(fresh, tmp_path / "adapter")
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, loaded(pixel_values=x).last_hidden_state)
    assert not any(p.requires_grad for p in fresh.parameters())  # PEFT default: inference
    again = SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), tmp_path / "adapter", is_trainable=True)
    assert again.trainable_layers == model.trainable_layers
    assert again.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    assert loaded.merge_and_unload() is fresh


def test_print_trainable_parameters_peft_format(vision, capsys):
    model = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in vision.parameters() if p.requires_grad) < total
    assert f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}" in capsys.readouterr().out


def test_bad_config_and_inputs(vision, tmp_path):
    with pytest.raises(ValueError, match="unknown freeze_rule 'mean'"):
        SpectralTuningConfig(freeze_rule="mean")
    with pytest.raises(ValueError, match=r"freeze_ratio must be in \[0, 1\], got 1.5"):
        SpectralTuningConfig(freeze_rule="ratio", freeze_ratio=1.5)
    with pytest.raises(ValueError, match="needs alpha_threshold"):
        SpectralTuningConfig(freeze_rule="threshold")
    with pytest.raises(ValueError, match="unknown granularity"):
        SpectralTuningConfig(granularity="head")
    with pytest.raises(ValueError, match="no analysable layer in CLIPVisionModel"):
        get_spectral_model(vision, SpectralTuningConfig(target_modules=["no_such_layer"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['segmentation_head'\] matches no module"):
        get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION, modules_to_save=["segmentation_head"]))
    with pytest.raises(ValueError, match="does not have"):
        get_spectral_model(vision, SpectralTuningConfig(layer_alphas={"decoder.fc": 3.0}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not a spectral tuning adapter config"):
        SpectralTuningConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "SPECTRAL_TUNING", "rank": 3}))
    with pytest.raises(ValueError, match=r"unknown SpectralTuningConfig field\(s\) \['rank'\]"):
        SpectralTuningConfig.from_pretrained(tmp_path)


def test_adapter_for_another_model_is_refused(tmp_path, tiny_clip_dir):
    base = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    get_spectral_model(base, SpectralTuningConfig(target_modules=VISION)).save_pretrained(tmp_path / "a")
    other = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="holds tensors Sequential does not have"):
        SpectralModel.from_pretrained(other, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), tmp_path / "a")


def test_reapply_saved_config_without_reanalysis(vision, tmp_path):
    cfg = SpectralTuningConfig(target_modules=VISION)
    get_spectral_model(vision, cfg)
    cfg.save_pretrained(tmp_path)
    loaded = SpectralTuningConfig.from_pretrained(tmp_path)
    assert loaded.layer_alphas == cfg.layer_alphas and loaded.trainable_layers == cfg.trainable_layers
    with mock.patch("opentrans_hf.methods.spectral_tuning.model.analyze_spectra", side_effect=AssertionError("re-analysed")):
        m = get_spectral_model(vision, loaded)
    assert m.trainable_layers == cfg.trainable_layers


def test_push_to_hub_and_offline(vision, fake_hub, monkeypatch):
    model = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION))
    url = model.push_to_hub("me/clip-spectral")
    assert [name for name, _ in fake_hub.calls] == ["create_repo", "create_commit"]
    assert url == f"https://huggingface.co/me/clip-spectral/commit/{0:040x}"
    assert fake_hub.commits()[0]["paths"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        model.push_to_hub("me/clip-spectral")


def test_to_lora_config_is_usable_with_peft(vision):
    import peft

    cfg = SpectralTuningConfig(target_modules=VISION)
    with pytest.raises(ValueError, match="run get_spectral_model"):
        cfg.to_lora_config(r=4)
    spectral = get_spectral_model(vision, cfg)
    lora_cfg = cfg.to_lora_config(r=4)
    assert isinstance(lora_cfg, peft.LoraConfig)
    base = CLIPVisionModel(vision.config)
    lora = peft.get_peft_model(base, lora_cfg)
    wrapped = {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == set(spectral.trainable_layers)


def test_spectral_param_groups_linear_in_alpha(vision):
    report = analyze_spectra(vision, target_modules=VISION)
    groups = spectral_param_groups(vision, report, lr=1e-3, min_scale=0.5, max_scale=1.5)
    layer_groups = [g for g in groups if g["name"] != "other"]
    alphas = [g["alpha"] for g in layer_groups]
    lo, hi = min(alphas), max(alphas)
    for g in layer_groups:
        assert g["lr"] == pytest.approx(1e-3 * (0.5 + (g["alpha"] - lo) / (hi - lo)))
    assert max(g["lr"] for g in layer_groups) == pytest.approx(1.5e-3)
    assert [g for g in groups if g["name"] == "other"][0]["lr"] == 1e-3
    opt = torch.optim.SGD(groups, lr=1e-3)  # usable by any optimizer
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == sum(1 for p in vision.parameters() if p.requires_grad)


def test_training_flops_against_hand_count():
    """MLP 16 -> 32 -> 32 -> 4 on a batch of 8, last two layers trainable. Per Linear (in, out): forward
    2*B*in*out; input-grad and weight-grad the same each. Frozen first layer: no weight grad, and no
    input grad (it is the lowest layer and the input does not require grad)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    B = 8
    f = [2 * B * 16 * 32, 2 * B * 32 * 32, 2 * B * 32 * 4]
    mlp[0].requires_grad_(False)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)

    res = estimate_training_flops(Wrap(), {"x": x}, loss_fn=lambda out: out.pow(2).sum())
    assert res["full"]["forward"] == res["tuned"]["forward"] == sum(f)
    # full: weight-grad for all three, input-grad for layers 2 and 3 (layer 1's input needs none)
    assert res["full"]["backward"] == sum(f) + f[1] + f[2]
    # tuned: layer 1 frozen and lowest -> nothing; layers 2 and 3 weight-grad; input-grad of layer 3 only
    assert res["tuned"]["backward"] == f[1] + f[2] + f[2]
    assert res["saving"] == pytest.approx(1 - (sum(f) + f[1] + 2 * f[2]) / (2 * sum(f) + f[1] + f[2]))
    assert not mlp[0].weight.requires_grad and mlp[2].weight.requires_grad and mlp[2].weight.grad is None


def test_find_and_freeze_unused_parameters(vision):
    model = get_spectral_model(vision, SpectralTuningConfig(target_modules=VISION))
    batch = {"pixel_values": torch.randn(1, 3, 30, 30)}
    head_loss = lambda out: out.last_hidden_state.mean()  # noqa: E731 -- a head reading last_hidden_state
    unused = find_unused_parameters(model, batch, head_loss)
    assert set(unused) == {"base_model.post_layernorm.weight", "base_model.post_layernorm.bias"}  # names in the model given
    assert freeze_unused_parameters(model, batch, head_loss) == unused
    assert not vision.post_layernorm.weight.requires_grad
    assert all(p.grad is None for p in vision.parameters())


def test_any_conv_model_with_resnet_blocks():
    torch.manual_seed(0)
    model = nn.Module()
    model.stem = nn.Conv2d(3, 16, 3)
    for i in (1, 2):
        st = nn.Module()
        for j in (0, 1):
            blk = nn.Module()
            blk.conv1 = nn.Conv2d(16, 16, 3, padding=1)
            blk.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            blk.bn = nn.BatchNorm2d(16)
            st.add_module(str(j), blk)
        model.add_module(f"layer{i}", st)
    spec = get_spectral_model(model, SpectralTuningConfig(granularity="block", train_norms=False))
    blocks = {block_of(n) for n in spec.analysed_layers}
    assert blocks == {"stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1"}
    for name in spec.analysed_layers:  # a block is frozen or trained as a whole
        same_block = [m for m in spec.analysed_layers if block_of(m) == block_of(name)]
        assert len({m in spec.frozen_layers for m in same_block}) == 1
    assert not model.layer1._modules["0"].bn.weight.requires_grad  # train_norms=False freezes norms
