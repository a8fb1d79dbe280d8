"""The Mask2Former and FC-CLIP frameworks behave as their references (transformers' Mask2FormerModel,
bytedance/fc-clip) do, with the defaults a user gets from ``from_clip``: Mask2Former's initialisation, FC-CLIP's
frozen encoder, class head and binary mask pooling, strides from the patch size, ignored pixels in the mask loss."""

import json
import math

import pytest
import torch
from transformers import CLIPConfig, Mask2FormerConfig, Mask2FormerModel

from opentrans_hf.models import CLIPFCCLIPConfig, CLIPFCCLIPForOVS, CLIPMask2FormerConfig, CLIPMask2FormerForOVS
from opentrans_hf.models.fcclip.modeling_fcclip import mask_pool

SMALL = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64,
             decoder_layers=2, train_num_points=128)
NAMES = ["sky", "grass", "water"]


def batch(b=2, size=30, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, k, (b, size, size), generator=g)


def test_mask2former_head_is_initialised_as_transformers_mask2former(tiny_clip_dir):
    model = CLIPMask2FormerForOVS.from_clip(tiny_clip_dir, fpn_channels=64, hidden_dim=64, mask_feature_size=64)
    cfg = model.config.mask2former_config(num_labels=1)
    torch.manual_seed(0)
    ref = Mask2FormerModel(Mask2FormerConfig(**{**cfg.to_dict(), "backbone_config": None}))
    ours = dict(model.head.named_parameters())
    theirs = {n.replace("pixel_level_module.decoder.", "pixel_decoder."): p for n, p in ref.named_parameters()
              if not n.startswith("pixel_level_module.encoder.")}
    compared = 0
    for name, r in theirs.items():
        o = ours[name]
        if o.shape != r.shape:  # the input projections read the backbone's channels (Swin's there, ours here)
            assert "input_projections" in name or "adapter_1" in name or "lateral" in name, name
            continue
        compared += 1
        if r.std() == 0 or r.numel() < 2:  # a constant init (zeros, ones, the ring grid): exactly equal
            assert torch.equal(o, r), name
        elif "sampling_offsets.bias" in name:
            assert torch.equal(o, r), name
        elif r.numel() >= 512:  # a random init of the same law: same spread
            assert float(o.detach().std()) == pytest.approx(float(r.detach().std()), rel=0.2), name
    assert compared > 0.8 * len(theirs)
    # the finding of the issue: the ring grid of the deformable attention (std 1.947 in the reference), not 0
    offsets = [p for n, p in ours.items() if n.endswith("sampling_offsets.bias")]
    assert offsets and all(float(p.detach().std()) > 1.0 for p in offsets)
    attn = [p for n, p in ours.items() if n.endswith("attention_weights.weight")]
    assert attn and all(bool((p == 0).all()) for p in attn)


def test_a_saved_model_reloads_its_initialised_head_exactly(tiny_clip_dir, tmp_path):
    model = CLIPMask2FormerForOVS.from_clip(tiny_clip_dir, **SMALL)
    model.save_pretrained(tmp_path / "m")
    loaded = CLIPMask2FormerForOVS.from_pretrained(tmp_path / "m")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_strides_follow_the_patch_size():
    for patch, strides in ((16, [4, 8, 16, 32]), (8, [2, 4, 8, 16]), (32, [8, 16, 32, 64]), (14, [1, 2, 4, 8]),
                           (2, [1, 2, 4, 8])):
        clip = CLIPConfig(vision_config=dict(patch_size=patch, image_size=patch * 4, hidden_size=32,
                                             intermediate_size=37, num_hidden_layers=2, num_attention_heads=4))
        cfg = CLIPMask2FormerConfig(clip_config=clip.to_dict())
        m2f = cfg.mask2former_config(num_labels=3)
        assert m2f.feature_strides == strides and m2f.common_stride == strides[0], patch


def test_fcclip_defaults_freeze_the_encoder_and_use_its_class_head_and_binary_pooling(tiny_clip_dir):
    model = CLIPFCCLIPForOVS.from_clip(tiny_clip_dir, **SMALL)
    assert model.config.freeze_clip_encoder and model.config.class_head == "mlp"
    assert model.config.mask_pooling == "binary"
    assert not any(p.requires_grad for p in model.clip.vision_model.parameters())
    before = {n: p.detach().clone() for n, p in model.clip.vision_model.named_parameters()}
    x, y = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(pixel_values=x, labels=y, class_names=NAMES).loss.backward()
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.clip.vision_model.named_parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # DDP-safe
    assert {"mask_pool_proj.0.weight", "class_embed.4.weight"} <= {n for n, p in model.named_parameters()
                                                                   if p.requires_grad}
    # frozen after a reload too
    assert model.config.to_dict()["freeze_clip_encoder"] is True


def test_fcclip_config_saved_before_these_settings_loads_as_it_was_trained(tiny_clip_dir, tmp_path):
    model = CLIPFCCLIPForOVS.from_clip(tiny_clip_dir, class_head="linear", mask_pooling="soft",
                                       freeze_clip_encoder=False, **SMALL)
    model.save_pretrained(tmp_path / "old")
    cfg_file = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("class_head", "mask_pooling", "freeze_clip_encoder"):
        del cfg[key]  # as the previous version wrote it
    cfg_file.write_text(json.dumps(cfg))
    loaded = CLIPFCCLIPForOVS.from_pretrained(tmp_path / "old")
    assert (loaded.config.class_head, loaded.config.mask_pooling, loaded.config.freeze_clip_encoder) == \
        ("linear", "soft", False)
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=x, class_names=NAMES).logits,
                                   model.eval()(pixel_values=x, class_names=NAMES).logits)
    with pytest.raises(ValueError, match="class_head must be one of"):
        CLIPFCCLIPConfig(class_head="mlp3")
    with pytest.raises(ValueError, match="mask_pooling must be one of"):
        CLIPFCCLIPConfig(mask_pooling="hard")


def test_mask_pool_is_fc_clips_binary_average():
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    logits = torch.full((2, 2, 4, 4), -1.0)
    logits[0, 0, :2, :2] = 3.0  # a 2x2 square
    pooled = mask_pool(feats, logits)
    torch.testing.assert_close(pooled[0, 0], feats[0, :, :2, :2].mean((-2, -1)))
    assert torch.equal(pooled[0, 1], torch.zeros(3))  # empty mask -> 0


def test_fcclip_empty_masks_keep_their_in_vocabulary_scores(tiny_clip_dir):
    model = CLIPFCCLIPForOVS.from_clip(tiny_clip_dir, **SMALL).eval()
    x, _ = batch()
    text = model.text_embeddings(NAMES)
    with torch.no_grad():
        classes, masks, vision_out = model.query_outputs(x, text)
        grid = (x.shape[-2] // 2, x.shape[-1] // 2)
        empty = masks[-1].clone()
        empty[:, 0] = -10.0  # query 0: an empty mask
        empty[:, 1] = 10.0  # query 1: the whole image
        p_out, valid = model.out_of_vocabulary_probabilities(empty, vision_out, text, grid)
        assert not valid[:, 0].any() and valid[:, 1].all()
        probs = model.class_probabilities(classes[-1], empty, vision_out, text, model.seen_classes(NAMES), grid)
    p_all = classes[-1].softmax(-1)
    in_vocab = classes[-1][..., :3].softmax(-1) * (1 - p_all[..., -1:])
    torch.testing.assert_close(probs[:, 0], in_vocab[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(probs[:, 1], in_vocab[:, 1])


@pytest.mark.parametrize("cls", [CLIPMask2FormerForOVS, CLIPFCCLIPForOVS])
def test_ignored_pixels_in_the_mask_loss(cls, tiny_clip_dir):
    """'exclude' (default): what the model predicts on ignored pixels does not change the loss; 'background':
    the reference's loss, transformers' own to the bit."""
    model = cls.from_clip(tiny_clip_dir, **SMALL)
    assert model.config.mask_loss_ignored == "exclude"
    x, y = batch()
    y[:, :, :10] = 255
    text = model.text_embeddings(NAMES)

    # points drawn independently of the predictions (no importance sampling), so that both calls see the same
    model.criterion(len(NAMES)).importance_sample_ratio = 0.0

    def loss_with(masks_edit, mode):
        model.config.mask_loss_ignored = mode
        classes, masks, _ = model.query_outputs(x, text)
        masks = [masks_edit(m) for m in masks]
        torch.manual_seed(0)  # the matcher's and the loss's point samples
        return model.mask2former_loss(classes, masks, y, len(NAMES))

    def on_ignored(m):  # change the masks only where every label is ignored (left third of the image)
        m = m.clone()
        m[..., : m.shape[-1] // 3 - 1] = 5.0
        return m

    with torch.no_grad():
        ident = lambda m: m  # noqa: E731
        a, b = loss_with(ident, "exclude"), loss_with(on_ignored, "exclude")
        assert math.isfinite(float(a)) and float(a) == pytest.approx(float(b), rel=1e-4)
        c, d = loss_with(ident, "background"), loss_with(on_ignored, "background")
        assert float(d) > float(c) + 1e-3
        # 'background' is transformers' Mask2FormerLoss unchanged
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

        from opentrans_hf.models.mask2former.modeling_mask2former import semantic_labels_to_masks

        model.config.mask_loss_ignored = "background"
        classes, masks, _ = model.query_outputs(x, text)
        crit = model.criterion(len(NAMES))
        crit.importance_sample_ratio = 0.75
        ref = Mask2FormerLoss(model.config.mask2former_config(num_labels=len(NAMES)), crit.weight_dict)
        ml, cl = semantic_labels_to_masks(y, 255)
        aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
        torch.manual_seed(0)
        theirs = ref(masks[-1], classes[-1], ml, cl, auxiliary_predictions=aux)
        torch.manual_seed(0)
        ours = crit(masks[-1], classes[-1], ml, cl, auxiliary_predictions=aux)
        for k in theirs:
            assert torch.equal(theirs[k], ours[k]), k
    with pytest.raises(ValueError, match="mask_loss_ignored must be one of"):
        CLIPMask2FormerConfig(mask_loss_ignored="drop")


@pytest.mark.slow
def test_probe_script_scores_every_setting(tiny_clip_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from opentrans_hf.embedded.dataset import CLASS_NAMES, HELD_OUT_CLASSES

    seen = [c for c in CLASS_NAMES if c not in HELD_OUT_CLASSES]
    model = CLIPFCCLIPForOVS.from_clip(tiny_clip_dir, seen_class_names=seen, **SMALL)
    model.save_pretrained(tmp_path / "model")
    script = Path(__file__).parents[2] / "examples" / "probe_fcclip_branches.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), "--embedded_size", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [l for l in res.stdout.splitlines() if " seen " in l and " unseen " in l]
    assert len(lines) == 7 and lines[-1].startswith("without the void factor")
