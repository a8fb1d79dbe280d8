"""``train --push_to_hub``: the model directory (weights, config, processor, card) and the adapters the run
wrote (``spectral_adapter/``, ``mask_adapter/``) in ONE commit, with ``--hub_private_repo``, ``--hub_revision``
and ``--hub_token`` passed through; the token is written nowhere; offline is refused before training.
``HfApi`` is patched (the ``fake_hub`` fixture): no network."""

import json

import pytest
from transformers import CLIPModel

from opentrans_hf import SparseMask, SpectralTuningConfig, magnitude_prune
from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import ArgumentError, parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.models import CLIPDeepLabV3ForOVS
from opentrans_hf.training.checkpoints import run_fingerprint
from opentrans_hf.training.optim import resolve_solver
from opentrans_hf.training.tracking import hyperparameters

RUN_FILES = [
    "README.md", "config.json",
    "mask_adapter/README.md", "mask_adapter/adapter_config.json", "mask_adapter/adapter_model.safetensors",
    "model.safetensors", "preprocessor_config.json", "processor_config.json",
    "spectral_adapter/README.md", "spectral_adapter/adapter_config.json", "spectral_adapter/adapter_model.safetensors",
    "tokenizer.json", "tokenizer_config.json",
]
SECRET = "hf_not_a_real_token_123"


@pytest.fixture(scope="module")
def mask_dir(tiny_clip_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask"
    magnitude_prune(CLIPModel.from_pretrained(tiny_clip_dir), 0.5).save_pretrained(path)
    return path


def train_argv(tiny_clip_dir, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
            "--embedded_size", "16", "--max_eval_examples", "2", "--learning_rate", "1e-3", "--max_steps", "1", *extra]


def test_train_pushes_model_processor_card_and_adapters_in_one_commit(tiny_clip_dir, mask_dir, tmp_path, fake_hub):
    out = tmp_path / "run"
    run_training(parse_args("train", train_argv(
        tiny_clip_dir, out, "--freeze_rule", "median", "--mask", str(mask_dir), "--push_to_hub",
        "--hub_model_id", "me/ovs", "--hub_private_repo", "--hub_revision", "exp-1", "--hub_token", SECRET)))

    assert [name for name, _ in fake_hub.calls] == ["create_repo", "create_branch", "create_commit"]
    (_, repo), (_, branch), (_, commit) = fake_hub.calls
    assert (repo["repo_id"], repo["private"], repo["exist_ok"], repo["token"]) == ("me/ovs", True, True, SECRET)
    assert (branch["repo_id"], branch["branch"], branch["exist_ok"], branch["token"]) == ("me/ovs", "exp-1", True, SECRET)
    assert (commit["repo_id"], commit["revision"], commit["token"]) == ("me/ovs", "exp-1", SECRET)
    assert commit["paths"] == RUN_FILES
    # the repo is the run's model directory, file for file
    pushed = fake_hub.repo_dir("me/ovs", "exp-1")
    for path in RUN_FILES:
        assert (pushed / path).read_bytes() == (out / "model" / path).read_bytes(), path
    model = CLIPDeepLabV3ForOVS.from_pretrained(pushed)
    assert model.tokenizer is not None and model.config.seen_class_names
    assert SparseMask.from_pretrained(pushed / "mask_adapter") == SparseMask.from_pretrained(mask_dir)
    assert SpectralTuningConfig.from_pretrained(pushed / "spectral_adapter").freeze_rule == "median"
    assert "me/ovs" in (pushed / "README.md").read_text()
    # the token is written nowhere
    for written in out.rglob("*"):
        if written.is_file():
            assert SECRET.encode() not in written.read_bytes(), written
    saved = json.loads((out / "metrics.json").read_text())["args"]
    assert saved["hub_token"] == "<HUB_TOKEN>" and saved["hub_revision"] == "exp-1"


def test_defaults_push_to_the_default_branch_with_the_logged_in_token(tiny_clip_dir, tmp_path, fake_hub):
    run_training(parse_args("train", train_argv(tiny_clip_dir, tmp_path / "run", "--push_to_hub",
                                                "--hub_model_id", "me/ovs")))
    assert [name for name, _ in fake_hub.calls] == ["create_repo", "create_commit"]
    (_, repo), (_, commit) = fake_hub.calls
    assert repo["private"] is None and repo["token"] is None and commit["token"] is None
    assert commit["revision"] is None
    assert "spectral_adapter/adapter_config.json" not in commit["paths"]  # no adapter in this run, none pushed
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(commit["paths"])


def test_token_stays_out_of_the_trackers_and_the_checkpoint_fingerprint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    args = parse_args("train", ["--push_to_hub", "--hub_model_id", "me/ovs", "--hub_token", SECRET])
    from opentrans_hf.training.trainer import framework_class

    hp = hyperparameters(args, resolve_solver(framework_class(args.framework), args))
    assert hp["hub_token"] == "<HUB_TOKEN>" and SECRET not in json.dumps(hp)
    other = parse_args("train", ["--push_to_hub", "--hub_model_id", "me/other", "--hub_token", "hf_other",
                                 "--hub_revision", "b", "--hub_private_repo"])
    assert run_fingerprint(args) == run_fingerprint(other)  # where it is pushed never blocks a resume


def test_push_offline_is_refused_before_training(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    rc = cli_main(["train", *train_argv(tiny_clip_dir, out, "--push_to_hub", "--hub_model_id", "me/ovs")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--push_to_hub me/ovs: HF_HUB_OFFLINE is set" in err
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--hub_token", SECRET], ["--hub_revision", "dev"], ["--hub_private_repo"]])
def test_hub_flags_need_push_to_hub(flags):
    with pytest.raises(ArgumentError, match=f"{flags[0]} only apply with --push_to_hub"):
        parse_args("train", ["--hub_model_id", "me/ovs", *flags])
