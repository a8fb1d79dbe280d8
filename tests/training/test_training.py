"""The Accelerate training / evaluation jobs and the demo pipeline, end to end on a tiny CLIP."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import HELPERS, launch_two_processes
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

from opentrans_hf import OVSImageProcessor, OVSProcessor, SparseMask, SpectralTuningConfig, magnitude_prune
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.methods.spectral_tuning import read_spectral_adapter
from opentrans_hf.models import CLIPDeepLabV3ForOVS, CLIPFCCLIPForOVS, CLIPMask2FormerForOVS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_mask(tiny_clip_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask"
    magnitude_prune(CLIPModel.from_pretrained(tiny_clip_dir), 0.5).save_pretrained(path)
    return path


def train(tiny_clip_dir, out, *extra):
    return run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "4",
        "--embedded_size", "16", "--max_eval_examples", "8", "--learning_rate", "1e-3", *extra,
    ]))


def test_train_writes_model_adapters_metrics_card_plots(tiny_clip_dir, tiny_mask, tmp_path):
    out = tmp_path / "run"
    metrics = train(tiny_clip_dir, out, "--max_steps", "6", "--freeze_rule", "median", "--mask", str(tiny_mask),
                    "--eval_steps", "3")
    # trained on the seen classes, evaluated on all 16 (4 held out: zero-shot)
    assert metrics["holdout_classes"] == ["snow", "forest", "flower", "tile"] and len(metrics["train_classes"]) == 12
    res = metrics["eval"]["embedded:validation"]
    assert len(res["per_category_iou"]) == 16 and 0.0 <= res["mean_iou"] <= 1.0
    assert "mean_iou_seen" in res and "mean_iou_unseen" in res
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval"]["embedded:validation"]["mean_iou"] == pytest.approx(res["mean_iou"])
    assert saved["steps"] == 6 and saved["args"]["freeze_rule"] == "median"
    assert "fractions of 1" in saved["units"]  # JSON keys hold fractions; people read percent
    # the model: loads with AutoModel, knows its seen classes, has the mask baked in
    model = AutoModel.from_pretrained(out / "model")
    assert isinstance(model, CLIPDeepLabV3ForOVS) and model.tokenizer is not None
    assert model.config.seen_class_names == metrics["train_classes"]
    mask = SparseMask.from_pretrained(out / "model" / "mask_adapter")
    assert mask == SparseMask.from_pretrained(tiny_mask)
    w = model.clip.vision_model.encoder.layers[1].mlp.fc2.weight
    assert bool((w[~mask.masks["encoder.layers.1.mlp.fc2.weight"]] == 0).all())
    # the spectral adapter: its config says what was frozen, its tensors are the trained ones
    cfg = SpectralTuningConfig.from_pretrained(out / "model" / "spectral_adapter")
    assert cfg.freeze_rule == "median" and cfg.trainable_layers and cfg.layer_alphas
    tensors = read_spectral_adapter(out / "model" / "spectral_adapter")[1]  # by the model's names
    state = model.state_dict()
    for name, t in tensors.items():
        torch.testing.assert_close(state[name], t, msg=name)
    assert not any(n.startswith("clip.text_model") for n in tensors)
    # the model card carries model-index metrics; plots are PNGs
    card = (out / "model" / "README.md").read_text()
    assert "model-index" in card and "mean_iou" in card and f"| {100 * res['mean_iou']:.2f} |" in card  # percent
    assert 'pipeline("open-vocabulary-segmentation", model="run")' in card  # the Hub id, else the run's name
    # the processor the transformers way: preprocessor_config.json + processor_config.json beside the weights
    assert isinstance(AutoImageProcessor.from_pretrained(out / "model"), OVSImageProcessor)
    processor = AutoProcessor.from_pretrained(out / "model")
    assert isinstance(processor, OVSProcessor) and processor.seen_class_names == metrics["train_classes"]
    for png in ("curves.png", "alpha.png", "predictions.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG
    outputs = json.loads((out / "outputs.json").read_text())
    assert Path(outputs["spectral_adapter"]).is_dir() and Path(outputs["mask_adapter"]).is_dir()


def test_resumed_run_ends_identical(tiny_clip_dir, tmp_path):
    args = ["--max_steps", "4", "--checkpointing_steps", "2", "--freeze_rule", "median", "--max_eval_examples", "2"]
    train(tiny_clip_dir, tmp_path / "a", *args)
    # an interrupted run: only the step-2 checkpoint exists; resume it in a fresh output dir
    shutil.copytree(tmp_path / "a" / "step_2", tmp_path / "b" / "step_2")
    train(tiny_clip_dir, tmp_path / "b", *args, "--resume_from_checkpoint", "latest")
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "a" / "metrics.json").read_text())
    hb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ha["final_train_loss"] == hb["final_train_loss"]


@pytest.mark.parametrize("framework,cls", [("mask2former", CLIPMask2FormerForOVS), ("fcclip", CLIPFCCLIPForOVS)])
def test_train_mask2former_frameworks(framework, cls, tiny_clip_dir, tmp_path):
    metrics = train(tiny_clip_dir, tmp_path, "--framework", framework, "--max_steps", "2", "--max_eval_examples", "4")
    assert metrics["framework"] == framework and metrics["final_train_loss"] > 0
    model = AutoModel.from_pretrained(tmp_path / "model")
    assert isinstance(model, cls) and model.config.seen_class_names == metrics["train_classes"]


def test_evaluate_several_datasets_own_class_names(tiny_clip_dir, tmp_path):
    import numpy as np
    from datasets import Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    from opentrans_hf.commands import evaluate
    from opentrans_hf.embedded.dataset import embedded_dataset

    train(tiny_clip_dir, tmp_path / "run", "--max_steps", "2")
    # a second dataset with other class names (3 classes; labels remapped)
    src = embedded_dataset("validation", image_size=30).select(range(6))
    names = ["sky", "grass", "lava"]
    rows = {"image": [], "label": []}
    for ex in src:
        rows["image"].append(ex["image"])
        rows["label"].append(PILImage.fromarray((np.array(ex["label"]) % 3).astype("uint8")))
    other = Dataset.from_dict(rows, features=Features({"image": Image(), "label": Image()}))
    (tmp_path / "other").mkdir()
    # a split directory of a DatasetDict, named by the id2label.json in the DatasetDict's directory
    DatasetDict({"validation": other}).save_to_disk(tmp_path / "other")
    (tmp_path / "other" / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    results = evaluate.run(parse_args("evaluate", ["--model", str(tmp_path / "run" / "model"), "--datasets", "embedded:validation",
                             str(tmp_path / "other" / "validation"), "--max_examples", "6", "--out", str(tmp_path / "eval.json")]))
    assert list(results) == ["embedded:validation", f"{tmp_path / 'other' / 'validation'}:validation"]
    assert len(results["embedded:validation"]["per_category_iou"]) == 16
    other_res = results[f"{tmp_path / 'other' / 'validation'}:validation"]
    assert len(other_res["per_category_iou"]) == 3 and "mean_iou_unseen" in other_res  # "lava" never trained
    table = (tmp_path / "eval.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[2].startswith(f"| {tmp_path / 'other' / 'validation'}:validation | id2label.json in ")
    assert "| 3 |" in rows[2]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["results"]["embedded:validation"]["mean_iou"] == pytest.approx(results["embedded:validation"]["mean_iou"])


def test_label_outside_classes_names_example_and_value(tiny_clip_dir, tmp_path):
    import numpy as np
    from datasets import Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    imgs = [PILImage.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)) for _ in range(3)]
    labs = [np.zeros((30, 30), dtype=np.uint8) for _ in range(3)]
    labs[2][5, 5] = 9
    ds = Dataset.from_dict({"image": imgs, "label": [PILImage.fromarray(l) for l in labs]},
                           features=Features({"image": Image(), "label": Image()}))
    DatasetDict({"train": ds, "validation": ds}).save_to_disk(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"example 2.*9"):
        train(tiny_clip_dir, tmp_path / "run", "--dataset", str(tmp_path / "bad"), "--class_names", "a", "b", "c",
              "--holdout_classes", "none", "--max_steps", "2", "--batch_size", "3")


def test_bad_arguments():
    from opentrans_hf.commands.train import TrainArguments

    with pytest.raises(ValueError, match="unknown framework"):
        TrainArguments(framework="segformer")
    with pytest.raises(ValueError, match="hub_model_id"):
        parse_args("train", ["--push_to_hub"])
    with pytest.raises(ValueError, match="either --spectral_config or --freeze_rule"):
        parse_args("train", ["--freeze_rule", "median", "--spectral_config", "x.json"])


def test_push_to_hub_uploads_the_model_folder(tiny_clip_dir, tmp_path, fake_hub):
    train(tiny_clip_dir, tmp_path, "--max_steps", "1", "--freeze_rule", "median", "--push_to_hub",
          "--hub_model_id", "me/ovs", "--max_eval_examples", "2")
    assert [(name, args["repo_id"]) for name, args in fake_hub.calls] == [("create_repo", "me/ovs"),
                                                                          ("create_commit", "me/ovs")]
    assert {"config.json", "model.safetensors", "README.md", "spectral_adapter/adapter_config.json",
            "tokenizer_config.json"} <= set(fake_hub.commits()[0]["paths"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_agree_and_adapters_load(tiny_clip_dir, tiny_mask, tmp_path):
    script = HELPERS / "ddp_train.py"
    res = launch_two_processes(script, tiny_clip_dir, tmp_path, tiny_mask, port=29613)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["metrics"]["eval"] == ranks[1]["metrics"]["eval"]
    assert ranks[0]["metrics"]["final_train_loss"] == ranks[1]["metrics"]["final_train_loss"]
    # the linear schedule spans the 3 optimizer steps (Accelerate steps the scheduler once per process)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["lr"] == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])
    SparseMask.from_pretrained(tmp_path / "model" / "mask_adapter")
    cfg = SpectralTuningConfig.from_pretrained(tmp_path / "model" / "spectral_adapter")
    assert cfg.trainable_layers
    AutoModel.from_pretrained(tmp_path / "model")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_demo_with_two_processes_including_its_baselines(tiny_clip_dir, tmp_path):
    """Every step of the demo, the baselines' evaluation included, runs as a collective under accelerate
    launch (a main-process-only evaluation would wait forever in the metric's all-reduce)."""
    res = launch_two_processes(Path(__file__).parents[2] / "scripts" / "demo.py", "--model_name_or_path", tiny_clip_dir,
                               "--output_dir", tmp_path, "--target_sparsity", "0.2", "--prune_rate", "0.2",
                               "--prune_steps_per_round", "1", "--max_steps", "2", "--embedded_size", "8",
                               "--max_eval_examples", "4", "--batch_size", "4", port=29641, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["comparison"]
    # this run, dense fine-tuned, dense CLIP, the pruned CLIP's own zero-shot, random labels
    assert len(rows) == 5 and all(0 <= r["mean_iou"] <= 1 for r in rows.values())
    assert any(name.startswith("pruned CLIP (original weights x mask)") for name in rows)
    assert res.stdout.count("| uniformly random labels |") == 1  # the table is printed once


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tiny_clip_dir, tmp_path):
    from opentrans_hf.cli import main as cli_main

    rc = cli_main(["demo", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path),
                   "--target_sparsity", "0.3", "--prune_rate", "0.2", "--prune_steps_per_round", "2",
                   "--max_steps", "3", "--embedded_size", "12", "--max_eval_examples", "4", "--batch_size", "4",
                   "--holdout_classes", "sky", "water"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pruning"]["sparsity"] == pytest.approx(1 - 0.8**2, abs=1e-3)
    assert summary["training"]["steps"] == 3 and "embedded:validation" in summary["eval"]
    assert summary["training"]["holdout_classes"] == ["sky", "water"]
    assert "mean_iou_unseen" in summary["eval"]["embedded:validation"]
    assert (tmp_path / "spectral" / "report.json").is_file() and (tmp_path / "spectral" / "alpha.png").is_file()
    mask = SparseMask.from_pretrained(tmp_path / "train" / "model" / "mask_adapter")
    assert mask == SparseMask.from_pretrained(tmp_path / "prune" / "mask")


@pytest.mark.slow
def test_spectral_config_reapplies_without_reanalysis(tiny_clip_dir, tmp_path, monkeypatch):
    first = tmp_path / "first"
    train(tiny_clip_dir, first, "--max_steps", "1", "--freeze_rule", "ratio", "--max_eval_examples", "2")
    saved = SpectralTuningConfig.from_pretrained(first / "model" / "spectral_adapter")
    import opentrans_hf.methods.spectral_tuning.model as tuning_model

    def no_analysis(*a, **k):
        raise AssertionError("the saved config must be re-applied without a new analysis")

    monkeypatch.setattr(tuning_model, "analyze_spectra", no_analysis, raising=False)
    for spec in (first / "model" / "spectral_adapter", first / "model" / "spectral_adapter" / "adapter_config.json"):
        out = tmp_path / f"again-{spec.name}"
        train(tiny_clip_dir, out, "--max_steps", "1", "--spectral_config", str(spec), "--max_eval_examples", "2")
        again = SpectralTuningConfig.from_pretrained(out / "model" / "spectral_adapter")
        assert again.trainable_layers == saved.trainable_layers and again.freeze_rule == "ratio"
