"""Atomic writes and the shared Hub helpers (no network: HfApi is patched, offline mode is checked)."""

import os

import pytest

from opentrans_hf.utils.hub import push_folder_to_hub, resolve_pretrained_dir
from opentrans_hf.utils.io import atomic_directory, atomic_write_text, atomic_write_with


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("a")
    assert (target / "weights").read_text() == "v1" and (target / "sub" / "x").read_text() == "a"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"  # the previous version is intact
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporaries left
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_resolve_local_dir_and_missing_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert resolve_pretrained_dir(tmp_path, ["adapter_config.json", "README.md"]) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"lacks \['adapter_model.safetensors'\]"):
        resolve_pretrained_dir(tmp_path, ["adapter_config.json", "adapter_model.safetensors"])
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_pretrained_dir(tmp_path / "adapter_config.json", ["adapter_config.json"])


def test_resolve_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"'someone/some-adapter' is not a local adapter directory.*HF_HUB_OFFLINE"):
        resolve_pretrained_dir("someone/some-adapter", ["adapter_config.json"])


def test_push_creates_repo_and_commits_the_folder(tmp_path, fake_hub):
    (tmp_path / "adapter_config.json").write_text("{}")
    url = push_folder_to_hub(tmp_path, "me/x", private=True, commit_message="msg")
    assert url == f"https://huggingface.co/me/x/commit/{0:040x}"
    (_, create), (_, commit) = fake_hub.calls
    assert (create["repo_id"], create["private"], create["exist_ok"], create["repo_type"]) == ("me/x", True, True, "model")
    assert commit["paths"] == ["adapter_config.json"]
    assert commit["repo_id"] == "me/x" and commit["commit_message"] == "msg"


def test_push_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot push to the Hub repo 'me/x': HF_HUB_OFFLINE is set"):
        push_folder_to_hub(tmp_path, "me/x")


def test_model_card_keeps_hub_base_model_and_drops_local_paths(tmp_path):
    import torch

    from opentrans_hf import magnitude_prune

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    mask = magnitude_prune(model, 0.5, target_modules=["0", "1"])
    for base, expected in (("openai/clip-vit-base-patch16", True), (str(tmp_path), False)):
        mask.base_model_name_or_path = base
        mask.save_pretrained(tmp_path / "m")
        meta = (tmp_path / "m" / "README.md").read_text().split("---")[1]
        assert ("base_model: openai/clip-vit-base-patch16" in meta) == expected
        assert ("base_model:" in meta) == expected
