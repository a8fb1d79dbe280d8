"""Sparse masks compose with PEFT tuners: a masked layer under LoRA (LoHa, LoKr, IA3) computes with
(W + ΔW) ⊙ M, before and after ``merge_and_unload()``, in either order of ``mask.apply`` and ``get_peft_model``.
Every check is against a dense copy of the model whose weights are set by hand."""

import copy

import peft
import pytest
import torch

from opentrans_hf import SparseMask, magnitude_prune

TARGETS = ["q_proj", "v_proj", "fc1"]


def _lora(**kw):
    # init_lora_weights=False: B is random too, so the delta is not zero from the start
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw)


def _pixels(model, n=2, seed=1):
    size = model.config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _lora_deltas(peft_model) -> dict[str, torch.Tensor]:
    """ΔW = B @ A * scaling of every LoRA layer, by hand, under the bare CLIPVisionModel's weight names."""
    prefix = "base_model.model."
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            dw = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            out[name.removeprefix(prefix) + ".weight"] = dw.detach().clone()
    assert out, "no LoRA layer found"
    return out


def _reference(dense, mask: SparseMask, deltas: dict[str, torch.Tensor]):
    """A plain copy of ``dense`` (no hooks) whose masked weights are (W + ΔW) ⊙ M."""
    ref = copy.deepcopy(dense).eval()
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in mask.masks.items():
            w = params[name]
            w.copy_((w + deltas.get(name, torch.zeros_like(w))) * m)
    return ref


def _out(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


@pytest.fixture
def vision_and_mask(tiny_vision):
    dense = copy.deepcopy(tiny_vision).eval()
    return dense, magnitude_prune(dense, 0.5, scope="layerwise")


def _check_merged(merged, mask, ref, x):
    params = dict(merged.named_parameters())
    assert set(params) == set(dict(ref.named_parameters()))  # a plain CLIPVisionModel again
    for name, m in mask.masks.items():
        assert torch.count_nonzero(params[name][~m]) == 0, name  # exactly zero at the masked positions
    torch.testing.assert_close(_out(merged, x), _out(ref, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["mask_then_peft", "peft_then_mask"])
def test_lora_forward_and_merge_equal_the_masked_dense_reference(vision_and_mask, order):
    dense, mask = vision_and_mask
    model = copy.deepcopy(dense)
    if order == "mask_then_peft":  # the usual order: prune, then add LoRA
        mask.apply(model)
        peft_model = peft.get_peft_model(model, _lora())
    else:
        peft_model = peft.get_peft_model(model, _lora())
        assert mask.apply(peft_model) == []  # names resolve through base_model.model. and .base_layer
    peft_model.eval()
    deltas = _lora_deltas(peft_model)
    assert {n.rsplit(".", 3)[-2] for n in deltas} == set(TARGETS)
    ref = _reference(dense, mask, deltas)
    x = _pixels(dense)

    plain_lora = _out(_reference(dense, SparseMask({}), deltas), x)  # LoRA's dense delta, no mask on it
    assert (plain_lora - _out(ref, x)).abs().max() > 1e-3  # the check below can tell the two apart
    torch.testing.assert_close(_out(peft_model, x), _out(ref, x), atol=1e-5, rtol=0)

    merged = peft_model.merge_and_unload()
    _check_merged(merged, mask, ref, x)
    assert SparseMask.from_model(merged) == mask  # the mask stays applied to the merged model


def test_masked_lora_gradients_match_the_reference_and_training_stays_sparse(vision_and_mask):
    dense, mask = vision_and_mask
    model = copy.deepcopy(dense)
    mask.apply(model)
    peft_model = peft.get_peft_model(model, _lora())
    x = _pixels(dense, seed=2)

    # gradients of A and B: the same as through (W + B @ A * s) ⊙ M computed by hand
    peft_model.eval()
    peft_model(pixel_values=x).last_hidden_state.square().mean().backward()
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    ref = copy.deepcopy(dense).eval()
    leaves, weights = {}, {}
    for name, w in ref.named_parameters():
        if name in mask.masks:
            layer = layers.get(name.removesuffix(".weight"))
            if layer is None:
                weights[name] = w.detach() * mask.masks[name]
                continue
            a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
            b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
            leaves[name] = (a, b, layer)
            weights[name] = (w.detach() + b @ a * layer.scaling["default"]) * mask.masks[name]
    out = torch.func.functional_call(ref, weights, kwargs={"pixel_values": x}).last_hidden_state
    out.square().mean().backward()
    for name, (a, b, layer) in leaves.items():
        torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
        assert layer.lora_A["default"].weight.grad.abs().sum() > 0

    # a few training steps with LoRA dropout: the base weights stay sparse, the merge too
    peft_model.train()
    for layer in layers.values():
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        peft_model(pixel_values=_pixels(dense, seed=10 + step)).last_hidden_state.square().mean().backward()
        opt.step()
    peft_model.eval()
    ref = _reference(dense, mask, _lora_deltas(peft_model))
    torch.testing.assert_close(_out(peft_model, x), _out(ref, x), atol=1e-5, rtol=0)
    _check_merged(peft_model.merge_and_unload(), mask, ref, x)


def test_lycoris_and_ia3_tuners_keep_the_mask(vision_and_mask):
    dense, mask = vision_and_mask
    x = _pixels(dense)
    for config in (peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
                   peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False)):
        model = copy.deepcopy(dense)
        mask.apply(model)
        peft_model = peft.get_peft_model(model, config).eval()
        deltas = {n.removeprefix("base_model.model.") + ".weight":
                  type(m).get_delta_weight(m, "default").detach().clone()  # the tuner's own (unmasked) delta
                  for n, m in peft_model.named_modules() if hasattr(m, "_available_adapters") and hasattr(m, "base_layer")}
        assert len(deltas) == 3 * dense.config.num_hidden_layers
        ref = _reference(dense, mask, deltas)
        torch.testing.assert_close(_out(peft_model, x), _out(ref, x), atol=1e-5, rtol=0, msg=type(config).__name__)
        _check_merged(peft_model.merge_and_unload(), mask, ref, x)

    # IA3 scales W ⊙ M row- or column-wise: zeros stay zeros; random scales so the check can fail
    model = copy.deepcopy(dense)
    mask.apply(model)
    peft_model = peft.get_peft_model(model, peft.IA3Config(target_modules=TARGETS, feedforward_modules=["fc1"])).eval()
    with torch.no_grad():
        for p in (p for n, p in peft_model.named_parameters() if "ia3_l" in n):
            p.uniform_(0.5, 1.5)
    merged = peft_model.merge_and_unload()
    for name, m in mask.masks.items():
        assert torch.count_nonzero(dict(merged.named_parameters())[name][~m]) == 0, name


def test_unsupported_tuners_are_refused_naming_the_layer(vision_and_mask):
    dense, mask = vision_and_mask
    peft_model = peft.get_peft_model(copy.deepcopy(dense), _lora(use_dora=True))
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\..*(q_proj|v_proj|fc1).*use_dora=False"):
        mask.apply(peft_model)
    # mask first, DoRA after: refused at the first forward, before any output
    model = copy.deepcopy(dense)
    mask.apply(model)
    peft_model = peft.get_peft_model(model, _lora(use_dora=True))
    with pytest.raises(ValueError, match=r"^encoder\.layers\.0\.(self_attn\.q_proj|self_attn\.v_proj|mlp\.fc1): LoRA variants"
                                         r".*use_dora=False"):
        peft_model(pixel_values=_pixels(dense))
    # a tuner whose delta is not additive (OFT rotates W)
    peft_model = peft.get_peft_model(copy.deepcopy(dense), peft.OFTConfig(r=0, oft_block_size=4, target_modules=["fc1"]))
    with pytest.raises(TypeError, match=r"encoder\.layers\.0\.mlp\.fc1.*peft\.tuners\.oft\.layer\.Linear.*supported tuner layers: LoRA"):
        mask.apply(peft_model)


def test_remove_deepcopy_and_from_model_on_a_peft_model(vision_and_mask, tmp_path):
    dense, mask = vision_and_mask
    peft_model = peft.get_peft_model(copy.deepcopy(dense), _lora()).eval()
    mask.apply(peft_model)
    assert SparseMask.from_model(peft_model) == mask  # canonical names, without base_model.model./.base_layer
    mask.save_pretrained(tmp_path / "mask")
    assert SparseMask.from_pretrained(tmp_path / "mask") == mask
    x = _pixels(dense)
    ref = _reference(dense, mask, _lora_deltas(peft_model))
    twin = copy.deepcopy(peft_model)  # the patches follow the copy
    torch.testing.assert_close(_out(twin, x), _out(ref, x), atol=1e-5, rtol=0)

    assert SparseMask.remove(twin) == len(mask.masks)
    assert not any("_sparse_mask_tuner" in m.__dict__ or "_sparse_mask_slots" in m.__dict__ for m in twin.modules())
    # the pruned weights stay zero (bake) and LoRA's delta is dense again: W ⊙ M + ΔW
    deltas = _lora_deltas(twin)
    plain = copy.deepcopy(dense).eval()
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, m in mask.masks.items():
            params[name].mul_(m).add_(deltas.get(name, 0))
    torch.testing.assert_close(_out(twin, x), _out(plain, x), atol=1e-5, rtol=0)


def test_a_saved_lora_adapter_loaded_onto_a_masked_base_and_injected_in_place(vision_and_mask, tmp_path):
    dense, mask = vision_and_mask
    trained = peft.get_peft_model(copy.deepcopy(dense), _lora()).eval()
    trained.save_pretrained(tmp_path / "lora")
    ref = _reference(dense, mask, _lora_deltas(trained))
    x = _pixels(dense, seed=3)

    base = copy.deepcopy(dense)
    mask.apply(base)  # a pruned model, then a LoRA adapter trained elsewhere loaded onto it
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(_out(loaded, x), _out(ref, x), atol=1e-5, rtol=0)
    _check_merged(loaded.merge_and_unload(), mask, ref, x)

    # tuner layers injected in place (as transformers' add_adapter does): no base_model.model. prefix
    model = copy.deepcopy(dense)
    mask.apply(model)
    model = peft.inject_adapter_in_model(_lora(), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(dict(trained.named_parameters())["base_model.model." + name])
    torch.testing.assert_close(_out(model.eval(), x), _out(ref, x), atol=1e-5, rtol=0)
    assert SparseMask.from_model(model) == mask


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_weights_written_at_masked_positions_are_zeroed_by_the_next_forward(vision_and_mask, dropout):
    """As without PEFT, the mask is re-applied to the stored W before every forward (with LoRA dropout and
    without, whose forward skips the base layer's call), so the merge writes zeros there too."""
    dense, mask = vision_and_mask
    model = copy.deepcopy(dense)
    mask.apply(model)
    peft_model = peft.get_peft_model(model, _lora(lora_dropout=dropout)).eval()
    ref = _reference(dense, mask, _lora_deltas(peft_model))
    with torch.no_grad():  # e.g. an optimizer with momentum from before the mask, or a hand edit
        for name, p in peft_model.named_parameters():
            if "base_layer.weight" in name:
                p.add_(1.0)
    x = _pixels(dense)
    dense_ref = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in dense_ref.named_parameters():
            if name in mask.masks and any(t in name for t in TARGETS):  # the LoRA-wrapped layers
                p.add_(mask.masks[name].float())  # the kept positions moved by 1
    torch.testing.assert_close(_out(peft_model, x), _out(dense_ref, x), atol=1e-5, rtol=0)
    _check_merged(peft_model.merge_and_unload(), mask, dense_ref, x)
