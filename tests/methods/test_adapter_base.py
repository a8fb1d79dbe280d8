"""``SparseMask`` and ``SpectralModel`` share one persistence base (``opentrans_hf.methods.base``): one write
path, one validated reader, one config reader, one card renderer, one ``push_to_hub``; a fix there is a
fix in both."""


import pytest
import torch

from opentrans_hf import SparseMask, SpectralModel, SpectralTuningConfig, get_spectral_model, magnitude_prune
from opentrans_hf.methods import base as adapters

FC = r".*mlp\.fc[12]"


@pytest.fixture
def both(tiny_clip_dir):
    """A mask and a spectral model, each built on its own fresh tiny CLIP vision tower."""
    from transformers import CLIPVisionModel

    from opentrans_hf.utils.hub import quiet_loading

    with quiet_loading():
        v1 = CLIPVisionModel.from_pretrained(tiny_clip_dir)
        v2 = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    mask = magnitude_prune(v1, 0.5)
    spectral = get_spectral_model(v2, SpectralTuningConfig(target_modules=FC))
    return mask, spectral, tiny_clip_dir


def fresh(clip_dir):
    from transformers import CLIPVisionModel

    from opentrans_hf.utils.hub import quiet_loading

    with quiet_loading():
        return CLIPVisionModel.from_pretrained(clip_dir)


def load(kind, d, clip_dir):
    return SparseMask.from_pretrained(d) if kind == "mask" else SpectralModel.from_pretrained(fresh(clip_dir), d)


def test_both_save_through_the_one_write_path(both, tmp_path, monkeypatch):
    mask, spectral, _ = both
    calls = []
    real = adapters.write_adapter_files

    def spy(directory, **kw):
        calls.append((str(directory), sorted(kw["config"]), kw["card"][:3]))
        return real(directory, **kw)

    monkeypatch.setattr(adapters, "write_adapter_files", spy)
    mask.save_pretrained(tmp_path / "mask")
    spectral.save_pretrained(tmp_path / "spectral")
    assert [c[0] for c in calls] == [str(tmp_path / "mask"), str(tmp_path / "spectral")]
    assert all("peft_type" in c[1] and c[2] == "---" for c in calls)  # config with peft_type, a card with metadata
    for d in ("mask", "spectral"):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors"]


def test_both_load_through_the_one_validated_reader(both, tmp_path, monkeypatch):
    mask, spectral, clip_dir = both
    mask.save_pretrained(tmp_path / "mask")
    spectral.save_pretrained(tmp_path / "spectral")
    seen = []
    real = adapters.read_adapter_files

    def spy(name_or_path, **kw):
        seen.append(kw["peft_type"])
        return real(name_or_path, **kw)

    monkeypatch.setattr(adapters, "read_adapter_files", spy)
    assert load("mask", tmp_path / "mask", clip_dir) == mask
    load("spectral", tmp_path / "spectral", clip_dir)
    assert seen == ["SPARSE_MASK", ("LN_TUNING", "SPECTRAL_TUNING")]


@pytest.mark.parametrize("kind", ["mask", "spectral"])
def test_a_truncated_weights_file_gets_the_same_error_from_both(both, tmp_path, kind):
    mask, spectral, clip_dir = both
    (mask if kind == "mask" else spectral).save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*not a complete safetensors file"):
        load(kind, tmp_path, clip_dir)


def test_each_refuses_the_others_adapter_naming_the_file(both, tmp_path):
    mask, spectral, clip_dir = both
    mask.save_pretrained(tmp_path / "mask")
    spectral.save_pretrained(tmp_path / "spectral")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not a sparse mask adapter config.*LN_TUNING"):
        SparseMask.from_pretrained(tmp_path / "spectral")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not a spectral tuning adapter config.*SPARSE_MASK"):
        SpectralModel.from_pretrained(fresh(clip_dir), tmp_path / "mask")


def test_both_push_through_the_one_helper(both, fake_hub):
    mask, spectral, _ = both
    assert SparseMask.push_to_hub is adapters.AdapterHubMixin.push_to_hub
    assert SpectralModel.push_to_hub is adapters.AdapterHubMixin.push_to_hub
    assert mask.push_to_hub("me/mask", private=True) == f"https://huggingface.co/me/mask/commit/{0:040x}"
    assert spectral.push_to_hub("me/spectral", commit_message="tuned") == f"https://huggingface.co/me/spectral/commit/{1:040x}"
    files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [(c["paths"], c["commit_message"], c["repo_id"]) for c in fake_hub.commits()] == [
        (files, "Upload sparse mask adapter", "me/mask"), (files, "tuned", "me/spectral")]
    assert [args["repo_id"] for name, args in fake_hub.calls if name == "create_repo"] == ["me/mask", "me/spectral"]


def test_a_fault_in_the_shared_writer_hits_both_and_leaves_no_config(both, tmp_path, monkeypatch):
    """One write path: a failing config write (here injected) fails both saves the same way."""
    mask, spectral, _ = both

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "write_adapter_config", broken)
    for obj, d in ((mask, tmp_path / "mask"), (spectral, tmp_path / "spectral")):
        with pytest.raises(OSError, match="disk full"):
            obj.save_pretrained(d)
        assert not (d / "adapter_config.json").exists()


def test_spectral_config_file_uses_the_shared_config_reader(both, tmp_path, monkeypatch):
    _, spectral, _ = both
    spectral.save_pretrained(tmp_path)
    seen = []
    real = adapters.read_adapter_config
    monkeypatch.setattr(adapters, "read_adapter_config", lambda *a, **kw: seen.append(a[1]) or real(*a, **kw))
    cfg = SpectralTuningConfig.from_pretrained(tmp_path)
    assert seen == [("LN_TUNING", "SPECTRAL_TUNING")] and cfg.trainable_layers == spectral.trainable_layers
    assert torch.is_tensor(next(iter(spectral.adapter_state_dict().values())))
