"""Every push of the library is ONE commit (``create_repo`` + ``create_branch`` for a revision +
``create_commit``), with ``revision``, ``private`` and ``token`` passed through: the shared helper, the
adapters' ``push_to_hub`` and the OVS models' ``push_to_hub`` (processor and card included). ``HfApi`` is
patched (the ``fake_hub`` fixture): no network."""

from unittest import mock

import pytest
from transformers import CLIPVisionModel

from opentrans_hf import SparseMask, SpectralTuningConfig, get_spectral_model, magnitude_prune
from opentrans_hf.models import CLIPDeepLabV3ForOVS
from opentrans_hf.utils.hub import push_folder_to_hub, redact_tokens

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def names(hub) -> list[str]:
    return [name for name, _ in hub.calls]


def test_a_folder_is_pushed_in_one_commit_with_revision_private_and_token(fake_hub, tmp_path):
    folder = tmp_path / "run"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.safetensors").write_bytes(b"\x00\x01")
    (folder / "sub" / "deeper" / "notes.txt").write_text("n")
    (folder / ".git" / "HEAD").write_text("ref")  # never pushed, as upload_folder leaves .git out

    url = push_folder_to_hub(folder, "me/x", private=True, token="hf_abc", revision="v1", commit_message="msg")

    assert names(fake_hub) == ["create_repo", "create_branch", "create_commit"]
    repo, branch, commit = (args for _, args in fake_hub.calls)
    assert (repo["repo_id"], repo["private"], repo["exist_ok"], repo["token"]) == ("me/x", True, True, "hf_abc")
    assert (branch["repo_id"], branch["branch"], branch["exist_ok"], branch["token"]) == ("me/x", "v1", True, "hf_abc")
    assert commit["paths"] == ["config.json", "sub/deeper/notes.txt", "sub/weights.safetensors"]
    assert (commit["repo_id"], commit["revision"], commit["token"], commit["commit_message"]) == ("me/x", "v1", "hf_abc",
                                                                                                 "msg")
    assert {c["api_token"] for _, c in fake_hub.calls} == {"hf_abc"}
    assert url == f"https://huggingface.co/me/x/commit/{0:040x}"
    pushed = fake_hub.repo_dir("me/x", "v1")
    assert (pushed / "sub" / "weights.safetensors").read_bytes() == b"\x00\x01"


def test_no_revision_no_branch_and_a_bare_name_goes_to_the_account(fake_hub, tmp_path):
    (tmp_path / "a.json").write_text("{}")
    push_folder_to_hub(tmp_path, "x")
    assert names(fake_hub) == ["create_repo", "create_commit"]
    repo, commit = (args for _, args in fake_hub.calls)
    assert repo["private"] is None and repo["token"] is None  # None: the account's default, the logged-in token
    assert commit["repo_id"] == "me/x" and commit["revision"] is None and commit["paths"] == ["a.json"]


def test_offline_missing_or_empty_folder_fail_before_any_hub_call(fake_hub, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"cannot push {tmp_path / 'nope'}: no such directory"):
        push_folder_to_hub(tmp_path / "nope", "me/x")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"cannot push {tmp_path / 'empty'}: it holds no file"):
        push_folder_to_hub(tmp_path / "empty", "me/x")
    (tmp_path / "empty" / "a.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot push to the Hub repo 'me/x': HF_HUB_OFFLINE is set"):
        push_folder_to_hub(tmp_path / "empty", "me/x")
    assert fake_hub.calls == []


def test_a_failed_hub_call_names_folder_repo_and_revision(fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "a.json").write_text("{}")

    def boom(self, *args, **kwargs):
        raise RuntimeError("403 Forbidden")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", boom)
    with pytest.raises(OSError, match=rf"pushing {tmp_path} to the Hub repo 'me/x' \(revision 'dev'\) failed: 403"):
        push_folder_to_hub(tmp_path, "me/x", revision="dev")


def test_redact_tokens():
    assert redact_tokens({"hub_token": "hf_abc", "hub_model_id": "me/x", "other_token": None, "lr": 1}) == {
        "hub_token": "<HUB_TOKEN>", "hub_model_id": "me/x", "other_token": None, "lr": 1}


@pytest.fixture
def adapters(tiny_clip_dir):
    vision = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    mask = magnitude_prune(vision, 0.5)
    spectral = get_spectral_model(CLIPVisionModel.from_pretrained(tiny_clip_dir), SpectralTuningConfig(freeze_rule="median"))
    return mask, spectral


def test_adapters_push_in_one_commit_with_revision_private_and_token(adapters, fake_hub):
    mask, spectral = adapters
    assert mask.push_to_hub("me/mask", private=True, token="hf_m", revision="r1").endswith(f"/commit/{0:040x}")
    spectral.push_to_hub("me/spectral", token="hf_s", commit_message="tuned", revision="refs/pr/3")
    assert names(fake_hub) == ["create_repo", "create_branch", "create_commit", "create_repo", "create_commit"]
    (_, repo), (_, branch), (_, commit) = fake_hub.calls[:3]
    assert repo["private"] is True and repo["token"] == "hf_m" and branch["branch"] == "r1"
    assert (commit["repo_id"], commit["revision"], commit["token"]) == ("me/mask", "r1", "hf_m")
    assert commit["paths"] == ADAPTER_FILES and commit["commit_message"] == "Upload sparse mask adapter"
    commit = fake_hub.commits()[1]  # a pull-request ref is pushed to as it is: no branch to create
    assert (commit["repo_id"], commit["revision"], commit["token"]) == ("me/spectral", "refs/pr/3", "hf_s")
    assert commit["paths"] == ADAPTER_FILES and commit["commit_message"] == "tuned"
    # what was pushed loads back
    assert SparseMask.from_pretrained(fake_hub.repo_dir("me/mask", "r1")) == mask
    assert SpectralTuningConfig.from_pretrained(fake_hub.repo_dir("me/spectral", "refs/pr/3")).layer_alphas == \
        spectral.spectral_config.layer_alphas


def test_adapters_offline_fail_before_saving_anything(adapters, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for adapter in adapters:
        with mock.patch.object(type(adapter), "save_pretrained") as save, pytest.raises(OSError, match="HF_HUB_OFFLINE"):
            adapter.push_to_hub("me/a")
        save.assert_not_called()
    assert fake_hub.calls == []


def test_ovs_model_pushes_weights_processor_and_card_in_one_commit(tiny_clip_dir, fake_hub):
    model = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir)
    model.push_to_hub("me/ovs", private=True, token="hf_o", revision="dev", commit_message="first")
    assert names(fake_hub) == ["create_repo", "create_branch", "create_commit"]
    (_, repo), (_, branch), (_, commit) = fake_hub.calls
    assert (repo["repo_id"], repo["private"], repo["exist_ok"], repo["token"]) == ("me/ovs", True, True, "hf_o")
    assert (branch["branch"], branch["exist_ok"], branch["token"]) == ("dev", True, "hf_o")
    assert (commit["repo_id"], commit["revision"], commit["token"], commit["commit_message"]) == (
        "me/ovs", "dev", "hf_o", "first")
    assert sorted(commit["paths"]) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                                       "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    pushed = fake_hub.repo_dir("me/ovs", "dev")
    loaded = CLIPDeepLabV3ForOVS.from_pretrained(pushed)
    assert loaded.tokenizer is not None
    assert loaded.get_image_processor().to_dict() == model.get_image_processor().to_dict()


def test_ovs_model_offline_fails_before_saving_anything(tiny_clip_dir, fake_hub, monkeypatch):
    model = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with mock.patch.object(CLIPDeepLabV3ForOVS, "save_pretrained") as save, \
            pytest.raises(OSError, match="cannot push to the Hub repo 'me/ovs': HF_HUB_OFFLINE is set"):
        model.push_to_hub("me/ovs")
    save.assert_not_called()
    assert fake_hub.calls == []

