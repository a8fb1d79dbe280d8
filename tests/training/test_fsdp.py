"""FSDP2 (``fully_shard``) with 2 processes on CPU: spectral tuning with mixed ``requires_grad`` and a sparse
mask, sharded checkpoints, resume, the saved model, and its evaluation."""

import json
import math

import pytest
import torch
from conftest import HELPERS, ROOT, launch_two_processes
from safetensors.torch import load_file
from transformers import AutoModel, CLIPModel

from opentrans_hf import SparseMask, SpectralTuningConfig, magnitude_prune
from opentrans_hf.cli import main as cli_main

FSDP_CPU_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"


@pytest.fixture(scope="module")
def half_mask(tiny_clip_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask"
    magnitude_prune(CLIPModel.from_pretrained(tiny_clip_dir), 0.5).save_pretrained(path)
    return path


def same_metrics(a: dict, b: dict) -> bool:
    """Equal evaluation results (NaN, for a class absent from the examples, equal to NaN)."""
    keys = ("mean_iou", "overall_accuracy", "mean_iou_seen", "mean_iou_unseen", "per_category_iou")

    def norm(v):
        if isinstance(v, list):
            return [norm(x) for x in v]
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return all(norm(a[k]) == norm(b[k]) for k in keys)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_trains_saves_resumes_and_evaluates_like_one_process(tiny_clip_dir, half_mask, tmp_path):
    res = launch_two_processes(HELPERS / "fsdp_train.py", tiny_clip_dir, tmp_path, half_mask, port=29671,
                               config_file=FSDP_CPU_CONFIG)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["distributed_type"] for r in ranks] == ["FSDP", "FSDP"]  # sharded, not DDP in disguise
    for key in ("eval", "final_train_loss", "steps", "num_processes"):
        assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key], key
    a, b = tmp_path / "a", tmp_path / "b"
    # the checkpoint holds each process's shards (SHARDED_STATE_DICT), the model is one complete directory
    assert sorted(p.name for p in (a / "step_2" / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp",
                                                                                                "__1_0.distcp"]
    saved = load_file(a / "model" / "model.safetensors")
    reference = AutoModel.from_pretrained(a / "model").state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in reference.items()}

    # mixed requires_grad: the frozen layers kept the CLIP's (masked) weights, the trainable ones moved
    cfg = SpectralTuningConfig.from_pretrained(a / "model" / "spectral_adapter")
    frozen = sorted(set(cfg.layer_alphas) - set(cfg.trainable_layers))
    assert frozen and cfg.trainable_layers
    clip = load_file(tiny_clip_dir / "model.safetensors")
    start_scale = AutoModel.from_pretrained(a / "model").config.logit_scale_init
    mask = SparseMask.from_pretrained(a / "model" / "mask_adapter")
    assert mask == SparseMask.from_pretrained(half_mask)

    def start(layer):
        w = clip[f"vision_model.{layer}.weight"]
        m = mask.masks.get(f"{layer}.weight")
        return w * m if m is not None else w

    for layer in frozen:
        assert torch.equal(saved[f"clip.vision_model.{layer}.weight"], start(layer)), layer
    assert all(not torch.equal(saved[f"clip.vision_model.{layer}.weight"], start(layer))
               for layer in cfg.trainable_layers)
    # the mask held through the sharded optimizer steps: every pruned weight is still zero
    for name, m in mask.masks.items():
        assert not saved[f"clip.vision_model.{name}"][~m].any(), name

    # the unsharded scalars (logit scales) trained as one: the same on both processes, as saved
    assert ranks[0]["whole"] == ranks[1]["whole"]
    scale = ranks[0]["whole"][0]["base_model.classifier.logit_scale"]
    assert scale == saved["classifier.logit_scale"].item() != start_scale

    # resumed from the step-2 checkpoint: the same model as the uninterrupted run, bit for bit
    resumed = load_file(b / "model" / "model.safetensors")
    assert resumed.keys() == saved.keys()
    for k in saved:
        assert torch.equal(saved[k], resumed[k]), k
    assert ranks[0]["resumed"]["eval"] == ranks[0]["metrics"]["eval"]

    # the run's evaluation (uneven shards of examples over the 2 processes) = one process evaluating the saved model
    assert cli_main(["evaluate", "--model", str(a / "model"), "--embedded_size", "8", "--max_examples", "5",
                     "--batch_size", "2", "--out", str(tmp_path / "eval.json")]) == 0
    single = json.loads((tmp_path / "eval.json").read_text())["results"]["embedded:validation"]
    assert same_metrics(ranks[0]["metrics"]["eval"]["embedded:validation"], single)


class _Launched:
    """What enable_fsdp2_on_cpu reads of an Accelerator that Accelerate set up for several CPU processes."""

    def __init__(self):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.MULTI_CPU
        self.state = self


def test_fsdp_on_cpu_is_fsdp2_for_real_and_fsdp1_is_refused(monkeypatch):
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from opentrans_hf.utils.distributed import enable_fsdp2_on_cpu

    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_CPU)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version 1 needs GPUs.*fsdp_version: 2"):
        enable_fsdp2_on_cpu(_Launched())
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "CLIPEncoderLayer")
    acc = _Launched()
    assert enable_fsdp2_on_cpu(acc)
    assert acc.distributed_type == DistributedType.FSDP and acc.fsdp_plugin.fsdp_version == 2
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # a DDP launch stays DDP
    assert not enable_fsdp2_on_cpu(_Launched())


def test_write_model_writes_the_gathered_state_dict_and_refuses_non_finite(tiny_clip_dir, tmp_path):
    from opentrans_hf.models import FRAMEWORKS
    from opentrans_hf.training.outputs import write_model

    model = FRAMEWORKS["deeplabv3"].from_clip(tiny_clip_dir, image_size=30, seen_class_names=["sky"])
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    gathered["aspp.branches.0.0.weight"].fill_(0.5)  # the module's own weights are not what is written
    write_model(tmp_path / "run", model, None, None, state_dict=gathered)
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert saved.keys() == gathered.keys()
    assert torch.equal(saved["aspp.branches.0.0.weight"], gathered["aspp.branches.0.0.weight"])
    gathered["aspp.branches.0.0.weight"][0] = float("nan")
    with pytest.raises(ValueError, match="parameter aspp.branches.0.0.weight holds nan"):
        write_model(tmp_path / "bad", model, None, None, state_dict=gathered)
    assert not (tmp_path / "bad" / "model").exists()


def test_ovs_models_name_their_input_embedding(tiny_clip_dir):
    from opentrans_hf.models import FRAMEWORKS

    for cls in FRAMEWORKS.values():  # Accelerate's FSDP2 shards it as a unit of its own
        model = cls.from_clip(tiny_clip_dir, image_size=30, seen_class_names=["sky"])
        assert model.get_input_embeddings() is model.clip.vision_model.embeddings.patch_embedding
