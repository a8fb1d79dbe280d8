"""SparseMask, magnitude pruning (vs torch.nn.utils.prune), counting, adapter files."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import SparseMask, count_params_and_flops, magnitude_prune
from opentrans_hf.methods.sparse_mask.mask import pack_bits, unpack_bits


@pytest.fixture
def vision(tiny_clip_dir):
    return CLIPVisionModel.from_pretrained(tiny_clip_dir)


def encoder_linears(model, prefix=""):
    return [(n, m) for n, m in model.named_modules() if n.startswith(prefix + "encoder.layers.") and isinstance(m, nn.Linear)]


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_global_masks_equal_torch_prune(vision, amount):
    mask = magnitude_prune(vision, amount)
    ref = copy.deepcopy(vision)
    layers = encoder_linears(ref)
    prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    assert set(mask.masks) == {f"{n}.weight" for n, _ in layers}  # patch embedding (the stem) spared
    for n, m in layers:
        assert torch.equal(mask.masks[f"{n}.weight"], m.weight_mask.bool()), n
    assert mask.sparsity == pytest.approx(amount, abs=1e-4)


def test_pruning_a_masked_model_prunes_among_survivors(vision):
    first = magnitude_prune(vision, 0.5)
    first.apply(vision)
    second = magnitude_prune(vision, 0.75)
    for n, m in first.masks.items():
        assert not (second.masks[n] & ~m).any(), f"{n}: a pruned weight came back"
    assert second.sparsity == pytest.approx(0.75, abs=1e-4)
    # torch's iterative pruning: the second call removes `amount` of what remains
    ref = copy.deepcopy(CLIPVisionModel(vision.config))
    ref.load_state_dict(vision.state_dict())
    layers = encoder_linears(ref)
    params = [(m, "weight") for _, m in layers]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
    for n, m in layers:
        assert torch.equal(second.masks[f"{n}.weight"], m.weight_mask.bool()), n


def test_layerwise_and_alpha_scopes(vision):
    lw = magnitude_prune(vision, 0.6, scope="layerwise")
    for n, s in lw.layer_sparsity().items():
        assert s == pytest.approx(0.6, abs=1 / vision.get_parameter(n).numel()), n
    alphas = {n: float(i) for i, (n, _) in enumerate(encoder_linears(vision))}  # increasing alpha
    al = magnitude_prune(vision, 0.5, scope="alpha", alphas=alphas, epsilon=0.3)
    sizes = {f"{n}.weight": m.weight.numel() for n, m in encoder_linears(vision)}
    pruned = sum(s * sizes[n] for n, s in al.layer_sparsity().items())
    assert pruned / sum(sizes.values()) == pytest.approx(0.5, abs=2e-3)  # global sparsity met
    names = [f"{n}.weight" for n in alphas]
    sp = al.layer_sparsity()
    assert sp[names[-1]] > sp[names[0]]  # higher alpha, pruned more
    ratio = sp[names[-1]] / sp[names[0]]
    assert ratio == pytest.approx(1.3 / 0.7, rel=0.02)  # linear within [s(1-eps), s(1+eps)] before rescaling
    with pytest.raises(ValueError, match="unknown scope"):
        magnitude_prune(vision, 0.5, scope="bogus")
    with pytest.raises(ValueError, match="matches no Linear/Conv layer"):
        magnitude_prune(vision, 0.5, target_modules=["decoder"])


def test_mask_transfers_from_clipmodel_to_vision_model(tmp_path, tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    mask = magnitude_prune(clip, 0.5)
    assert all(n.startswith("encoder.layers.") for n in mask.masks)  # canonical, vision-tower relative
    mask.save_pretrained(tmp_path / "mask")
    loaded = SparseMask.from_pretrained(tmp_path / "mask")
    assert loaded == mask
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    assert loaded.apply(vision) == [] and mask.apply(clip) == []
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        assert torch.allclose(vision(pixel_values=x).pooler_output, clip.vision_model(pixel_values=x).pooler_output, atol=1e-6)
    w = clip.vision_model.encoder.layers[1].mlp.fc2.weight
    assert torch.equal(w == 0, ~mask.masks["encoder.layers.1.mlp.fc2.weight"] | (w == 0))
    # a model that holds the CLIP one level deeper (CLIPSeg-style `clip.vision_model.`)
    wrapper = nn.Module()
    wrapper.clip = CLIPModel.from_pretrained(tiny_clip_dir)
    assert mask.apply(wrapper) == []
    assert (wrapper.clip.vision_model.encoder.layers[0].self_attn.q_proj.weight[~mask.masks["encoder.layers.0.self_attn.q_proj.weight"]] == 0).all()


def test_masked_weights_stay_zero_through_training(vision):
    mask = magnitude_prune(vision, 0.7)
    mask.apply(vision)
    opt = torch.optim.AdamW(vision.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(2, 3, 30, 30)
    for _ in range(3):
        vision(pixel_values=x).pooler_output.pow(2).sum().backward()
        fc1 = vision.encoder.layers[0].mlp.fc1.weight
        m = mask.masks["encoder.layers.0.mlp.fc1.weight"]
        assert (fc1.grad[~m] == 0).all() and (fc1.grad[m] != 0).any()
        opt.step()
        opt.zero_grad()
    for name, m in mask.masks.items():
        w = vision.get_parameter(name)
        assert (w[~m] == 0).all(), name
    assert (vision.encoder.layers[0].mlp.fc1.weight[mask.masks["encoder.layers.0.mlp.fc1.weight"]] != 0).float().mean() > 0.99


def test_deepcopy_state_dict_and_remove(vision):
    keys = sorted(vision.state_dict())
    mask = magnitude_prune(vision, 0.5)
    mask.apply(vision, keep_pruned=True)
    assert sorted(vision.state_dict()) == keys  # state_dict unchanged by the mask
    twin = copy.deepcopy(vision)
    assert SparseMask.from_model(twin) == mask
    # the copy keeps its own mask: training it keeps its zeros, and leaves the original alone
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(pixel_values=torch.randn(1, 3, 30, 30)).pooler_output.sum().backward()
    opt.step()
    for name, m in mask.masks.items():
        assert (twin.get_parameter(name)[~m] == 0).all()
    assert SparseMask.remove(twin, bake=True) == len(mask.masks)
    assert SparseMask.from_model(twin).masks == {} and SparseMask.from_model(vision) == mask
    before = vision.encoder.layers[0].mlp.fc1.weight.clone()
    SparseMask.remove(vision, bake=False)  # restores the pruned values
    restored = vision.encoder.layers[0].mlp.fc1.weight
    m = mask.masks["encoder.layers.0.mlp.fc1.weight"]
    assert (restored[~m] != 0).all() and torch.equal(restored[m], before[m])


def test_strict_errors_and_non_strict(vision):
    mask = magnitude_prune(vision, 0.5)
    bad = SparseMask(dict(mask.masks, **{"encoder.layers.7.mlp.fc1.weight": torch.ones(37, 32, dtype=torch.bool)}))
    with pytest.raises(KeyError, match="'encoder.layers.7.mlp.fc1.weight' matches no parameter of CLIPVisionModel"):
        bad.apply(vision)
    wrong = SparseMask({"encoder.layers.0.mlp.fc1.weight": torch.ones(32, 37, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"has shape \(32, 37\) but CLIPVisionModel.encoder.layers.0.mlp.fc1.weight has shape \(37, 32\)"):
        wrong.apply(vision)
    fresh = CLIPVisionModel(vision.config)
    assert bad.apply(fresh, strict=False) == ["encoder.layers.7.mlp.fc1.weight"]
    assert SparseMask.from_model(fresh) == mask


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (13, 3, 3, 3), (1000, 17)])
def test_bit_packing_round_trip_odd_sizes(shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.4
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), m)


def test_adapter_file_is_about_one_bit_per_weight(tmp_path):
    from opentrans_hf.embedded.random_clip import build_random_clip_vision

    vision = build_random_clip_vision("small")
    mask = magnitude_prune(vision, 0.9)
    mask.save_pretrained(tmp_path)
    bits = (tmp_path / "adapter_model.safetensors").stat().st_size * 8 / mask.num_weights
    assert bits <= 1.1, bits
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SPARSE_MASK" and cfg["method"] == "magnitude-global"
    assert cfg["target_sparsity"] == 0.9 and abs(cfg["sparsity"] - 0.9) < 1e-4
    assert set(cfg["layer_densities"]) == set(mask.masks) and "library_version" in cfg
    assert "Sparse mask" in (tmp_path / "README.md").read_text()


def test_corrupt_or_mismatched_files(tmp_path, vision):
    from safetensors.torch import save_file

    mask = magnitude_prune(vision, 0.5)
    d = mask.save_pretrained(tmp_path / "m")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read .*adapter_model.safetensors"):
        SparseMask.from_pretrained(d)
    name = "encoder.layers.0.mlp.fc1.weight"
    packed = {n: pack_bits(m) for n, m in mask.masks.items()}
    save_file(dict(packed, **{name: packed[name][:-1]}), str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"entry '{name}' holds .* expected 148 uint8 bytes"):
        SparseMask.from_pretrained(d)
    save_file({n: p for n, p in packed.items() if n != name}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"missing \\['{name}'\\]"):
        SparseMask.from_pretrained(d)
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="LORA")))
    with pytest.raises(ValueError, match="not a sparse mask adapter"):
        SparseMask.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="lacks"):
        SparseMask.from_pretrained(tmp_path)


def test_push_to_hub_and_offline(vision, fake_hub, monkeypatch):
    mask = magnitude_prune(vision, 0.5)
    assert mask.push_to_hub("me/m", private=True) == f"https://huggingface.co/me/m/commit/{0:040x}"
    (_, create), (_, commit) = fake_hub.calls
    assert (create["repo_id"], create["private"], create["exist_ok"], create["repo_type"]) == ("me/m", True, True, "model")
    assert commit["repo_id"] == "me/m"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        mask.push_to_hub("me/m")


def test_count_params_and_macs_by_hand(vision):
    """Tiny config: 15x15 patches + CLS = 226 tokens, width 32, MLP 37, 2 layers, patch 2x2x3."""
    T, D, I = 226, 32, 37
    r = count_params_and_flops(vision)
    linear = 2 * (4 * T * D * D + 2 * T * D * I)
    patch = 225 * D * (3 * 2 * 2)
    attention = 2 * 2 * T * T * D  # q @ k^T and attn @ v, per layer
    assert sum(r["layer_macs"].values()) == linear + patch
    assert r["macs"] == linear + patch + attention
    assert r["params"] == sum(p.numel() for p in vision.parameters()) == r["effective_params"]
    mask = magnitude_prune(vision, 0.5)
    rm = count_params_and_flops(vision, mask)
    assert rm["params"] - rm["effective_params"] == mask.num_weights - sum(int(m.sum()) for m in mask.masks.values())
    assert rm["effective_macs"] == pytest.approx(patch + attention + 0.5 * linear, rel=1e-3)
    clip_counts = count_params_and_flops(CLIPModel(CLIPModel.config_class(vision_config=vision.config.to_dict())), mask)
    assert clip_counts["macs"] == rm["macs"]  # a CLIPModel counts its vision tower
