"""On a model holding both CLIP towers, spectral tuning's default trains only the image encoder: the text
tower, ``logit_scale`` and the projections stay frozen unless targeted, so an adapter made with the
default config on ``CLIPModel`` holds only vision-tower tensors and loads on every host of that tower."""

import pytest
import torch
from safetensors.torch import save_file
from spectral_formats import to_previous_format
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import SpectralModel, SpectralTuningConfig, get_spectral_model
from opentrans_hf.methods.spectral_tuning import read_spectral_adapter
from opentrans_hf.models import FRAMEWORKS

TEXT_LAYERS = r"text_model\.encoder\.layers\.\d+\..*"
OUTSIDE_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def trainable_outside_vision(clip: CLIPModel) -> list[str]:
    return [n for n, p in clip.named_parameters() if p.requires_grad and not n.startswith("vision_model.")]


def requires_grad(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def vision_tower_requires_grad(clip: CLIPModel) -> dict[str, bool]:
    """``requires_grad`` of the vision tower's parameters, by CLIPVisionModel's names (``embeddings...``)."""
    return {n.removeprefix("vision_model."): g for n, g in requires_grad(clip).items() if n.startswith("vision_model.")}


def test_default_config_on_clipmodel_trains_no_text_tensor(tiny_clip_dir, tmp_path):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    assert all(p.requires_grad for p in clip.parameters())  # as from_pretrained gives it
    spectral = get_spectral_model(clip, SpectralTuningConfig(freeze_rule="median"))
    assert trainable_outside_vision(clip) == []
    assert not clip.logit_scale.requires_grad and not clip.text_projection.weight.requires_grad
    assert not clip.visual_projection.weight.requires_grad
    assert spectral.analysed_layers and all(n.startswith(("vision_model.encoder.", "vision_model.embed"))
                                            for n in spectral.analysed_layers)
    # the vision tower is tuned exactly as CLIPVisionModel's is by the same default
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    get_spectral_model(vision, SpectralTuningConfig(freeze_rule="median"))
    in_clip = vision_tower_requires_grad(clip)
    assert in_clip == requires_grad(vision)
    assert any(in_clip.values()) and not all(in_clip.values())

    d = spectral.save_pretrained(tmp_path / "adapter")
    _, tensors = read_spectral_adapter(d)  # by their names in the model
    assert tensors and all(n.startswith("vision_model.") for n in tensors)
    assert set(tensors) == {"vision_model." + n for n, g in in_clip.items() if g}
    # unload gives the model back with the requires_grad it had before
    assert all(p.requires_grad for p in spectral.unload().parameters())


def test_the_default_adapter_of_clipmodel_loads_on_clipvisionmodel_and_every_framework(tiny_clip_dir, tmp_path):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    spectral = get_spectral_model(clip, SpectralTuningConfig(freeze_rule="median"))
    with torch.no_grad():  # "trained" weights, to see them arrive
        for p in clip.parameters():
            if p.requires_grad:
                p.add_(0.25)
    d = spectral.save_pretrained(tmp_path / "adapter")
    vision_state = {n.removeprefix("vision_model."): p.detach().clone()
                    for n, p in clip.named_parameters() if n.startswith("vision_model.")}
    pixels = torch.randn(2, 3, clip.config.vision_config.image_size, clip.config.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0))

    loaded = SpectralModel.from_pretrained(CLIPVisionModel.from_pretrained(tiny_clip_dir), d)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, expected)
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    SpectralModel.from_pretrained(vision, d, is_trainable=True)
    assert requires_grad(vision) == vision_tower_requires_grad(clip)

    for name, cls in FRAMEWORKS.items():  # each with its own defaults (FC-CLIP keeps its encoder frozen)
        model = cls.from_clip(tiny_clip_dir)
        SpectralModel.from_pretrained(model, d, is_trainable=True)
        params = dict(model.clip.vision_model.named_parameters())
        for n, t in vision_state.items():
            assert torch.equal(params[n], t), (name, n)
        assert not [n for n, p in model.clip.named_parameters() if p.requires_grad and not n.startswith("vision_model.")]


def test_text_tower_trains_when_targeted(tiny_clip_dir, tmp_path):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    cfg = SpectralTuningConfig(target_modules=TEXT_LAYERS, modules_to_save=["text_projection", "logit_scale"])
    spectral = get_spectral_model(clip, cfg)
    assert spectral.analysed_layers and all(n.startswith("text_model.encoder.layers.") for n in spectral.analysed_layers)
    modules = dict(clip.named_modules())
    assert spectral.frozen_layers and spectral.trainable_layers
    assert not any(modules[m].weight.requires_grad for m in spectral.frozen_layers)
    assert all(modules[m].weight.requires_grad for m in spectral.trainable_layers)
    # the targeted tower's other parameters keep their requires_grad, as the vision tower's do
    assert clip.text_model.final_layer_norm.weight.requires_grad and clip.text_model.embeddings.token_embedding.weight.requires_grad
    assert clip.text_projection.weight.requires_grad and clip.logit_scale.requires_grad  # modules_to_save
    assert not clip.visual_projection.weight.requires_grad  # not targeted
    d = spectral.save_pretrained(tmp_path / "adapter")
    _, tensors = read_spectral_adapter(d)
    assert {"logit_scale", "text_projection.weight"} <= set(tensors) and "visual_projection.weight" not in tensors
    again = CLIPModel.from_pretrained(tiny_clip_dir)
    SpectralModel.from_pretrained(again, d, is_trainable=True)
    assert requires_grad(again) == requires_grad(clip)


def test_explicit_vision_targets_leave_the_text_tower_frozen_too(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    get_spectral_model(clip, SpectralTuningConfig(target_modules=r"vision_model\.encoder\.layers\.\d+\..*"))
    assert trainable_outside_vision(clip) == []
    # modules_to_save names a module or a parameter; naming neither is an error
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    get_spectral_model(clip, SpectralTuningConfig(modules_to_save=["text_model"]))
    assert all(p.requires_grad for p in clip.text_model.parameters())
    assert trainable_outside_vision(clip) == [n for n, _ in clip.named_parameters() if n.startswith("text_model.")]
    with pytest.raises(ValueError, match=r"modules_to_save=\['logit_scales'\] matches no module or parameter of CLIPModel"):
        get_spectral_model(CLIPModel.from_pretrained(tiny_clip_dir), SpectralTuningConfig(modules_to_save=["logit_scales"]))


def test_a_framework_keeps_its_own_text_tower_choice(tiny_clip_dir):
    """The frameworks freeze the CLIP parts no head trains through themselves; freeze_text_encoder=False is
    the model's own request to train the text tower, and the default spectral config keeps it."""
    small = {"aspp_channels": 16}
    frozen = FRAMEWORKS["deeplabv3"].from_clip(tiny_clip_dir, **small)
    get_spectral_model(frozen, SpectralTuningConfig())
    assert not any(p.requires_grad for p in frozen.clip.text_model.parameters())
    assert not frozen.clip.logit_scale.requires_grad and not frozen.clip.text_projection.weight.requires_grad
    trained = FRAMEWORKS["deeplabv3"].from_clip(tiny_clip_dir, freeze_text_encoder=False, **small)
    get_spectral_model(trained, SpectralTuningConfig())
    assert all(p.requires_grad for p in trained.clip.text_model.parameters())
    assert trained.clip.text_projection.weight.requires_grad


def test_an_adapter_that_trained_the_text_tower_still_loads(tiny_clip_dir, tmp_path, capsys):
    """Earlier versions left the text tower trainable under the default config: their CLIPModel adapters hold
    its tensors. They load on CLIPModel (the values arrive); the text tower stays frozen, with a warning."""
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    d = get_spectral_model(clip, SpectralTuningConfig()).save_pretrained(tmp_path / "adapter")
    path = d / "adapter_model.safetensors"
    tensors = to_previous_format(d)  # as those versions wrote it
    extra = {n: p.detach() + 0.5 for n, p in clip.named_parameters() if n.startswith(OUTSIDE_VISION)}
    save_file({**tensors, **extra}, str(path), metadata={"format": "pt"})
    capsys.readouterr()
    again = CLIPModel.from_pretrained(tiny_clip_dir)
    SpectralModel.from_pretrained(again, d, is_trainable=True)
    params = dict(again.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in extra.items())
    assert trainable_outside_vision(again) == []
    err = capsys.readouterr().err
    assert f"warning: {path} holds {len(extra)} tensor(s) (logit_scale, text_model." in err
    assert "stay frozen" in err and "modules_to_save" in err


def test_clipseg_default_trains_its_image_encoder_and_decoder_only():
    """Any two-tower CLIP inside a model counts: CLIPSeg's ``clip`` keeps its text side frozen, its decoder trains."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPSegConfig(
        text_config={**tower, "vocab_size": 100, "max_position_embeddings": 16, "eos_token_id": 2},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=8, extract_layers=[1, 2], reduce_dim=8, decoder_num_attention_heads=2, decoder_intermediate_size=16)
    model = CLIPSegForImageSegmentation(config)
    spectral = get_spectral_model(model, SpectralTuningConfig())
    assert spectral.analysed_layers and all(n.startswith("clip.vision_model.") for n in spectral.analysed_layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("clip.vision_model.", "decoder.")) for n in trainable)
    assert any(n.startswith("decoder.") for n in trainable)
    assert not model.clip.logit_scale.requires_grad and not model.clip.visual_projection.weight.requires_grad
