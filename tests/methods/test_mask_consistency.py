"""Fault probe class 3 (issue 24): weights that contradict their mask.

A model directory saved WITH its mask (a training run's ``model/`` with ``mask_adapter/``) promises that the
pruned weights are zero. Weights edited afterwards (the pruned positions of a masked layer set non-zero in
model.safetensors while ``mask_adapter/`` stays) are refused wherever the directory is loaded -- evaluate,
predict, the pipeline, ``from_pretrained`` -- naming the layer and the count. Applying a mask to a dense model
(the transfer use: ``train --mask``, ``SparseMask.apply``) still prunes it.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPModel, pipeline

from opentrans_hf import CLIPDeepLabV3ForOVS, SparseMask, magnitude_prune
from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.methods.sparse_mask import load_sparse_pretrained

LAYER = "encoder.layers.1.mlp.fc1.weight"  # a mask entry (canonical name)
PARAM = f"clip.vision_model.{LAYER}"  # the framework's parameter it masks
BROKEN = 7  # pruned positions set non-zero


@pytest.fixture(scope="module")
def run_dir(tiny_clip_dir, tmp_path_factory):
    """A finished training run with a sparse mask: out/model holds model.safetensors and mask_adapter/."""
    root = tmp_path_factory.mktemp("masked-run")
    magnitude_prune(CLIPModel.from_pretrained(tiny_clip_dir), 0.5).save_pretrained(root / "mask")
    run_training(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(root / "out"), "--batch_size", "4",
        "--embedded_size", "16", "--max_eval_examples", "4", "--max_steps", "2", "--mask", str(root / "mask")]))
    return root / "out"


def _copy_model(run_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(run_dir / "model", d)
    return d


def _break_pruned_weights(model_dir, n=BROKEN):
    """Set ``n`` pruned positions of the masked layer non-zero in model.safetensors (mask_adapter/ stays)."""
    mask = SparseMask.from_pretrained(model_dir / "mask_adapter").masks[LAYER]
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    w = weights[PARAM]
    assert not w[~mask].any(), "the trained model keeps its pruned weights at zero"
    pruned = (~mask).reshape(-1).nonzero().squeeze(1)[:n]
    w.view(-1)[pruned] = 0.5
    save_file(weights, str(path), metadata={"format": "pt"})


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    return errors[0]


def test_evaluate_refuses_weights_that_contradict_their_mask(run_dir, tmp_path, capsys):
    d = _copy_model(run_dir, tmp_path)
    _break_pruned_weights(d)
    out = tmp_path / "eval.json"
    rc = cli_main(["evaluate", "--model", str(d), "--max_examples", "2", "--out", str(out)])
    assert rc == 1
    line = _one_error_line(capsys)
    assert f"layer {PARAM} has {BROKEN} non-zero weights where the mask {d / 'mask_adapter'} is 0" in line, line
    assert str(d / "model.safetensors") in line
    assert not out.exists()  # no result of the contradicting weights


def test_consistent_run_evaluates_and_reports_the_mask(run_dir, tmp_path, capsys):
    d = _copy_model(run_dir, tmp_path)
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--model", str(d), "--max_examples", "2", "--out", str(out)]) == 0
    cost = json.loads(out.read_text())["cost"]
    assert cost["sparse_mask"] == str(d / "mask_adapter") and cost["params_effective"] < cost["params"]


def test_predict_pipeline_and_from_pretrained_refuse_it(run_dir, tmp_path, capsys):
    from PIL import Image

    d = _copy_model(run_dir, tmp_path)
    _break_pruned_weights(d, n=3)
    expected = f"layer {PARAM} has 3 non-zero weights where the mask {d / 'mask_adapter'} is 0"
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        AutoModel.from_pretrained(d)
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        CLIPDeepLabV3ForOVS.from_pretrained(d)
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        pipeline("open-vocabulary-segmentation", model=str(d))
    Image.new("RGB", (30, 30), (10, 200, 30)).save(tmp_path / "img.png")
    rc = cli_main(["predict", "--model", str(d), "--images", str(tmp_path / "img.png"), "--classes", "sky,grass",
                   "--output_dir", str(tmp_path / "pred")])
    assert rc == 1 and expected in _one_error_line(capsys)
    assert not (tmp_path / "pred" / "areas.json").exists()


def test_every_contradicting_layer_is_counted(run_dir, tmp_path):
    d = _copy_model(run_dir, tmp_path)
    mask = SparseMask.from_pretrained(d / "mask_adapter")
    model = CLIPDeepLabV3ForOVS.from_pretrained(d)
    assert mask.pruned_nonzero(model) == {}
    with torch.no_grad():
        for name, count in ((LAYER, 4), ("encoder.layers.0.self_attn.q_proj.weight", 2)):
            param = model.get_parameter(f"clip.vision_model.{name}")
            pruned = (~mask.masks[name]).reshape(-1).nonzero().squeeze(1)[:count]
            param.view(-1)[pruned] = -1.0
    assert mask.pruned_nonzero(model) == {f"clip.vision_model.{LAYER}": 4,
                                          "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight": 2}
    with pytest.raises(ValueError, match=r"has 4 non-zero weights where the mask m is 0 \(and 1 more layer: 6 in all\)"):
        mask.check_weights(model, "m")


def test_repair_by_loading_unchecked_and_applying_the_mask(run_dir, tmp_path):
    d = _copy_model(run_dir, tmp_path)
    _break_pruned_weights(d)
    model = AutoModel.from_pretrained(d, check_mask=False)  # the weights as they are
    assert isinstance(model, CLIPDeepLabV3ForOVS)
    mask = SparseMask.from_pretrained(d / "mask_adapter")
    assert sum(mask.pruned_nonzero(model).values()) == BROKEN
    mask.apply(model)  # prunes them again
    fixed = tmp_path / "fixed"
    model.save_pretrained(fixed)
    mask.save_pretrained(fixed / "mask_adapter")
    reloaded = CLIPDeepLabV3ForOVS.from_pretrained(fixed)
    assert mask.pruned_nonzero(reloaded) == {}


def test_a_mask_applied_to_a_dense_model_still_prunes_it(tiny_clip_dir, tmp_path):
    """The transfer use: a mask is applied to a model that was not saved with it (no check, it prunes)."""
    model = CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=30)
    mask = magnitude_prune(CLIPModel.from_pretrained(tiny_clip_dir), 0.5)
    assert mask.pruned_nonzero(model)[PARAM] > 0  # a dense model: the mask's pruned weights are non-zero
    mask.apply(model)
    assert mask.pruned_nonzero(model) == {}
    # saved with its mask, it loads
    model.save_pretrained(tmp_path / "model")
    mask.save_pretrained(tmp_path / "model" / "mask_adapter")
    CLIPDeepLabV3ForOVS.from_pretrained(tmp_path / "model")


def test_a_dense_model_without_a_mask_loads_unchecked(tiny_clip_dir, tmp_path):
    model = CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=30)
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModel.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.clip.vision_model.encoder.layers[1].mlp.fc1.weight,
                       model.clip.vision_model.encoder.layers[1].mlp.fc1.weight)


def test_sparse_storage_cannot_contradict_its_mask(run_dir, tmp_path):
    """The model's own sparse storage keeps only the kept values: pruned weights load as zeros, and its
    mask_adapter/ (if one is put beside it) is checked like a dense save's."""
    model = CLIPDeepLabV3ForOVS.from_pretrained(run_dir / "model")
    mask = SparseMask.from_pretrained(run_dir / "model" / "mask_adapter")
    model.save_pretrained(tmp_path / "sparse", sparse_storage=True, sparse_mask=mask)
    loaded = load_sparse_pretrained(CLIPDeepLabV3ForOVS, tmp_path / "sparse")
    assert mask.pruned_nonzero(loaded) == {}
    mask.save_pretrained(tmp_path / "sparse" / "mask_adapter")
    CLIPDeepLabV3ForOVS.from_pretrained(tmp_path / "sparse")
    other = magnitude_prune(model.clip, 0.9)  # a stronger mask than the weights carry: a contradiction
    shutil.rmtree(tmp_path / "sparse" / "mask_adapter")
    other.save_pretrained(tmp_path / "sparse" / "mask_adapter")
    with pytest.raises(ValueError, match=r"non-zero weights where the mask .*mask_adapter is 0"):
        CLIPDeepLabV3ForOVS.from_pretrained(tmp_path / "sparse")


def test_a_mask_that_does_not_fit_its_model_is_refused_naming_both(run_dir, tmp_path):
    d = _copy_model(run_dir, tmp_path)
    mask = SparseMask.from_pretrained(d / "mask_adapter")
    bad = SparseMask({**mask.masks, LAYER: torch.ones(3, 3, dtype=torch.bool)})
    shutil.rmtree(d / "mask_adapter")
    bad.save_pretrained(d / "mask_adapter")
    with pytest.raises(ValueError, match=rf"mask {d / 'mask_adapter'} does not fit the model in {d}: .*shape \(3, 3\)"):
        AutoModel.from_pretrained(d)
