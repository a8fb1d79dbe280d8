"""The three OVS frameworks: forward/backward, open-vocabulary prediction, round trips, transfer of
masks and spectral tuning, FC-CLIP's ensemble, bad input."""

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import SparseMask, SpectralTuningConfig, get_spectral_model, magnitude_prune
from opentrans_hf.models import (
    ENCODER_TARGET_MODULES,
    FRAMEWORKS,
    CLIPFCCLIPForOVS,
    CLIPMask2FormerForOVS,
    geometric_ensemble,
)

SMALL_M2F = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64,
                 decoder_layers=2, train_num_points=128)
OVERRIDES = {"deeplabv3": dict(aspp_channels=16), "mask2former": SMALL_M2F, "fcclip": SMALL_M2F}
NAMES = ["sky", "grass", "water"]


def build(name, clip_dir, **kw):
    return FRAMEWORKS[name].from_clip(clip_dir, **{**OVERRIDES[name], **kw})


def batch(b=2, size=30, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    y = torch.randint(0, k, (b, size, size), generator=g)
    y[:, :4] = 255
    return x, y


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_forward_backward_trains_head_and_encoder_not_text(name, tiny_clip_dir):
    model = build(name, tiny_clip_dir)
    x, y = batch()
    out = model(pixel_values=x, labels=y, class_names=NAMES)
    assert out.logits.shape == (2, 3, 30, 30) and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # DDP-safe: every trainable parameter received a gradient in this forward
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # FC-CLIP keeps its CLIP image encoder frozen (its design); the others fine-tune it
    encoder_trained = any(n.startswith("clip.vision_model.") for n in trainable)
    assert encoder_trained == (name != "fcclip")
    assert not any(n.startswith("clip.text_model.") for n in trainable)
    assert "clip.logit_scale" not in trainable and "classifier.logit_scale" in trainable
    assert not any("post_layernorm" in n or "visual_projection" in n for n in trainable)
    # a few optimizer steps lower the loss on this batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = out.loss.item()
    for _ in range(6):
        opt.zero_grad()
        loss = model(pixel_values=x, labels=y, class_names=NAMES).loss
        loss.backward()
        opt.step()
    assert loss.item() < first


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_predict_open_vocabulary_and_raw_images(name, tiny_clip_dir):
    model = build(name, tiny_clip_dir).eval()
    x, _ = batch()
    unseen = ["zebra crossing", "lava", "stained glass", "moss"]  # never seen in training
    preds = model.predict(x, unseen)
    assert len(preds) == 2 and preds[0].shape == (30, 30) and preds[0].dtype == torch.int64
    assert int(preds[0].max()) < len(unseen) and int(preds[0].min()) >= 0
    # predict is the argmax of the forward's scores
    logits = model(pixel_values=x, class_names=unseen).logits
    assert torch.equal(torch.stack(preds), logits.argmax(1))
    # raw images of other sizes: resized in, label maps back at each image's size
    raw = [np.random.default_rng(0).integers(0, 255, (41, 53, 3), dtype=np.uint8), torch.rand(3, 20, 24)]
    maps = model.predict(raw, ["sky", "road"])
    assert [tuple(m.shape) for m in maps] == [(41, 53), (20, 24)]


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_save_load_round_trip_with_tokenizer(name, tiny_clip_dir, tmp_path):
    model = build(name, tiny_clip_dir, prompt_templates=["a photo of a {}.", "a {} texture."]).eval()
    x, _ = batch()
    with torch.no_grad():
        ref = model(pixel_values=x, class_names=NAMES).logits
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()
    loaded = FRAMEWORKS[name].from_pretrained(tmp_path / "m").eval()
    assert loaded.config.prompt_templates == ["a photo of a {}.", "a {} texture."]
    with torch.no_grad():
        got = loaded(pixel_values=x, class_names=NAMES).logits
    torch.testing.assert_close(got, ref)
    # frozen parts are frozen again after loading
    assert not any(p.requires_grad for p in loaded.clip.text_model.parameters())


def test_from_clip_keeps_the_clip_weights(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = build("deeplabv3", tiny_clip_dir)
    for n, p in clip.state_dict().items():
        torch.testing.assert_close(model.clip.state_dict()[n], p, msg=n)


def test_class_embedding_cache(tiny_clip_dir):
    model = build("deeplabv3", tiny_clip_dir)
    a = model.text_embeddings(NAMES)
    assert model.text_embeddings(NAMES) is a  # cached for a frozen text encoder
    assert model.text_embeddings(NAMES[::-1]) is not a
    torch.testing.assert_close(model.text_embeddings(NAMES[::-1]), a.flip(0))
    with torch.no_grad():  # weights changed in place: the cache is not reused
        model.clip.text_projection.weight.add_(torch.randn_like(model.clip.text_projection.weight))
    b = model.text_embeddings(NAMES)
    assert b is not a and not torch.allclose(a, b)
    # prompt ensemble: normalised mean of per-template normalised CLIP text features
    tok = model.tokenizer([t.format("sky") for t in model.config.prompt_templates], padding=True, return_tensors="pt")
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.clip.get_text_features(**tok).pooler_output, dim=-1)
    torch.testing.assert_close(b[0], torch.nn.functional.normalize(f.mean(0), dim=-1))


def test_trainable_text_encoder_gets_gradients(tiny_clip_dir):
    model = build("deeplabv3", tiny_clip_dir, freeze_text_encoder=False)
    x, y = batch()
    model(pixel_values=x, labels=y, class_names=NAMES).loss.backward()
    assert model.clip.text_model.embeddings.token_embedding.weight.grad is not None


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_mask_made_on_bare_clip_applies_to_framework(name, tiny_clip_dir, tmp_path):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    mask = magnitude_prune(clip, 0.6)
    mask.save_pretrained(tmp_path / "mask")
    mask = SparseMask.from_pretrained(tmp_path / "mask")
    model = build(name, tiny_clip_dir)
    mask.apply(model, strict=True)
    fc1 = model.clip.vision_model.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(fc1 == 0, ~mask.masks["encoder.layers.0.mlp.fc1.weight"])
    # the framework's encoder computes what the masked bare vision model computes
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    mask.apply(vision)
    x, y = batch()
    with torch.no_grad():
        a = vision(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        b = model.clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(a, b)
    # and training keeps the pruned weights at zero (FC-CLIP: the encoder is frozen, masked as it is)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(pixel_values=x, labels=y, class_names=NAMES).loss.backward()
    opt.step()
    pruned = ~mask.masks["encoder.layers.0.mlp.fc1.weight"]
    assert (fc1.grad is not None) == (name != "fcclip")
    assert bool((fc1[pruned] == 0).all()) and bool((fc1[~pruned] != 0).all())


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_spectral_tuning_freezes_only_encoder_layers(name, tiny_clip_dir):
    model = build(name, tiny_clip_dir)
    head_before = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip.")}
    spectral = get_spectral_model(model, SpectralTuningConfig(target_modules=ENCODER_TARGET_MODULES))
    assert spectral.frozen_layers and spectral.trainable_layers
    for layer in spectral.frozen_layers + spectral.trainable_layers:
        assert layer.startswith("clip.vision_model.encoder.layers.") or layer.endswith("patch_embedding"), layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head_before <= trainable  # heads untouched
    for layer in spectral.frozen_layers:
        assert f"{layer}.weight" not in trainable
    x, y = batch()
    spectral(pixel_values=x, labels=y, class_names=NAMES).loss.backward()


def test_geometric_ensemble_limits(tiny_clip_dir):
    p_in = torch.tensor([[0.7, 0.2, 0.1]])
    p_out = torch.tensor([[0.1, 0.3, 0.6]])
    void = torch.tensor([[0.25]])
    seen = torch.tensor([True, True, False])
    only_in = geometric_ensemble(p_in, p_out, seen, 0.0, 0.0, void)
    torch.testing.assert_close(only_in, torch.tensor([[0.7 * 0.75, 0.2 * 0.75, 0.1 * 0.75, 0.25]]), atol=1e-6, rtol=0)
    only_out = geometric_ensemble(p_in, p_out, seen, 1.0, 1.0, void)
    torch.testing.assert_close(only_out, torch.tensor([[0.1 * 0.75, 0.3 * 0.75, 0.6 * 0.75, 0.25]]), atol=1e-6, rtol=0)
    mixed = geometric_ensemble(p_in, p_out, seen, 0.4, 0.8, void)
    raw = torch.tensor([0.7**0.6 * 0.1**0.4, 0.2**0.6 * 0.3**0.4, 0.1**0.2 * 0.6**0.8])
    torch.testing.assert_close(mixed[0, :3], raw / raw.sum() * 0.75, atol=1e-6, rtol=0)


def test_fcclip_without_ood_weight_equals_mask2former(tiny_clip_dir):
    # with FC-CLIP's OOV weights at 0 and the Mask2Former variant's class head, FC-CLIP is that variant
    fc = build("fcclip", tiny_clip_dir, ensemble_alpha=0.0, ensemble_beta=0.0, class_head="linear").eval()
    m2f = CLIPMask2FormerForOVS(CLIPMask2FormerForOVS.config_class(**{
        k: v for k, v in fc.config.to_dict().items()
        if k not in ("ensemble_alpha", "ensemble_beta", "freeze_clip_encoder", "class_head", "mask_pooling")
    }), tokenizer=fc.tokenizer).eval()
    m2f.load_state_dict(fc.state_dict())
    x, _ = batch()
    with torch.no_grad():
        a = fc(pixel_values=x, class_names=NAMES).logits
        b = m2f(pixel_values=x, class_names=NAMES).logits
    # in-vocabulary probabilities renormalised over the K classes, times (1 - void): same argmax
    assert torch.equal(a.argmax(1), b.argmax(1))
    # with the OOV branch on, seen and unseen classes are weighted differently
    fc.config.ensemble_alpha, fc.config.ensemble_beta = 0.4, 0.8
    fc.config.seen_class_names = ["sky"]
    with torch.no_grad():
        c = fc(pixel_values=x, class_names=NAMES).logits
    assert not torch.allclose(a, c)


def test_mask2former_semantic_inference(tiny_clip_dir):
    model = build("mask2former", tiny_clip_dir).eval()
    x, _ = batch()
    with torch.no_grad():
        out = model(pixel_values=x, class_names=NAMES)
    probs = out.class_queries_logits.softmax(-1)[..., :3]
    masks = torch.nn.functional.interpolate(out.masks_queries_logits, size=(30, 30), mode="bilinear").sigmoid()
    expected = (probs[:, :, :, None, None] * masks[:, :, None]).sum(1)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.class_queries_logits.shape == (2, SMALL_M2F["num_queries"], 4)  # K + void


def test_bad_input_errors(tiny_clip_dir):
    model = build("deeplabv3", tiny_clip_dir)
    x, y = batch()
    with pytest.raises(ValueError, match="class_names is empty"):
        model.predict(x, [])
    with pytest.raises(ValueError, match="needs the classes as exactly one of class_names"):
        model(pixel_values=x)
    with pytest.raises(ValueError, match="duplicates"):
        model(pixel_values=x, class_names=["sky", "sky"])
    with pytest.raises(ValueError, match=r"4 dimensions.*\(30, 30\)"):
        model(pixel_values=torch.randn(30, 30), class_names=NAMES)
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 1, 30, 30\)"):
        model.predict(torch.randn(2, 1, 30, 30), NAMES)
    with pytest.raises(ValueError, match="multiple of the CLIP patch size"):
        model(pixel_values=torch.randn(1, 3, 31, 30), class_names=NAMES)
    bad = y.clone()
    bad[1, 10, 10] = 7
    with pytest.raises(ValueError, match="batch example 1 contain the value 7"):
        model(pixel_values=x, labels=bad, class_names=NAMES)
    with pytest.raises(ValueError, match="images\\[0\\]"):
        model.predict([np.zeros((5, 5, 2), dtype=np.uint8)], NAMES)
    with pytest.raises(ValueError, match="multiples of 32"):
        build("mask2former", tiny_clip_dir, fpn_channels=48)
    with pytest.raises(ValueError, match="feature_layers entry 9"):
        build("deeplabv3", tiny_clip_dir, feature_layers=[1, 2, 2, 9])
    with pytest.raises(ValueError, match="ensemble_alpha"):
        build("fcclip", tiny_clip_dir, ensemble_alpha=1.5)
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        model(pixel_values=x, class_names=NAMES)
    with pytest.raises(OSError, match="local directory"):
        CLIPFCCLIPForOVS.from_clip(tiny_clip_dir.parent)


def test_spectral_tuning_skips_encoder_layers_no_head_reads(tiny_clip_dir):
    model = build("deeplabv3", tiny_clip_dir, feature_layers=[1, 1, 1, 1])  # layer 1 (0-based) unused
    assert not any(p.requires_grad for p in model.clip.vision_model.encoder.layers[1].parameters())
    spectral = get_spectral_model(model, SpectralTuningConfig(target_modules=model.encoder_target_modules()))
    assert all(".encoder.layers.0." in n or "patch_embedding" in n for n in spectral.analysed_layers)
    x, y = batch()
    spectral(pixel_values=x, labels=y, class_names=NAMES).loss.backward()
    # DDP-safe: nothing trainable is left without a gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_batch_with_no_labelled_pixel(name, tiny_clip_dir):
    """A crop showing only held-out (ignored) classes: finite loss, every trainable parameter still in
    the graph (a DDP step must not fail on it)."""
    model = build(name, tiny_clip_dir)
    x, _ = batch()
    y = torch.full((2, 30, 30), 255)
    loss = model(pixel_values=x, labels=y, class_names=NAMES).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
