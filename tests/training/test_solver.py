"""Each framework trains with its reference's solver by default (detectron2-style ``SolverConfig`` on the config
class), the train job's flags override it field by field, and the trainer builds detectron2's parameter groups,
warm-up + poly schedule and full-model gradient clipping."""

import math

import pytest
import torch

from opentrans_hf.commands import ArgumentError, parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.models import FRAMEWORKS, CLIPMask2FormerForOVS
from opentrans_hf.models.configuration_ovs import SolverConfig
from opentrans_hf.training.optim import make_optimizer, make_scheduler, parameter_groups, resolve_solver

SMALL = "fpn_channels=32,hidden_dim=32,mask_feature_size=32,num_queries=6,dim_feedforward=64,decoder_layers=2," \
        "train_num_points=128"


def args(framework="mask2former", *extra):
    return parse_args("train", ["--framework", framework, *extra])


def test_the_frameworks_carry_their_references_solvers():
    m2f = resolve_solver(FRAMEWORKS["mask2former"], args("mask2former"))
    assert (m2f.learning_rate, m2f.backbone_multiplier, m2f.weight_decay, m2f.weight_decay_norm,
            m2f.weight_decay_embed, m2f.lr_scheduler_type, m2f.poly_power, m2f.max_grad_norm) == \
        (1e-4, 0.1, 0.05, 0.0, 0.0, "polynomial", 0.9, 0.01)
    assert resolve_solver(FRAMEWORKS["fcclip"], args("fcclip")) == m2f
    dl = resolve_solver(FRAMEWORKS["deeplabv3"], args("deeplabv3"))
    assert (dl.learning_rate, dl.backbone_multiplier, dl.lr_scheduler_type, dl.max_grad_norm) == (1e-3, 1.0, "linear", None)


def test_flags_override_field_by_field():
    s = resolve_solver(FRAMEWORKS["mask2former"], args("mask2former", "--learning_rate", "3e-4",
                                                       "--backbone_lr_multiplier", "0.5", "--max_grad_norm", "0"))
    assert (s.learning_rate, s.backbone_multiplier, s.max_grad_norm, s.weight_decay) == (3e-4, 0.5, None, 0.05)
    for bad, match in ((["--learning_rate", "0"], "learning_rate must be a finite number > 0"),
                       (["--backbone_lr_multiplier", "-1"], "backbone_multiplier must be >= 0"),
                       (["--warmup_steps", "-2"], "warmup_steps must be an integer >= 0"),
                       (["--max_grad_norm", "-1"], "max_grad_norm must be > 0")):
        with pytest.raises(ArgumentError, match=match):
            args("mask2former", *bad)
    with pytest.raises(ValueError, match="unknown solver setting"):
        SolverConfig().replace(lr=1.0)


def test_parameter_groups_are_detectron2s(tiny_clip_dir):
    model = CLIPMask2FormerForOVS.from_clip(tiny_clip_dir, fpn_channels=32, hidden_dim=32, mask_feature_size=32,
                                            num_queries=6, dim_feedforward=64, decoder_layers=2)
    solver = FRAMEWORKS["mask2former"].config_class.solver
    groups = parameter_groups(model, solver)
    by_name = {n: g for g in groups for n in g["names"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable) and sum(len(g["names"]) for g in groups) == len(trainable)
    fc1 = "clip.vision_model.encoder.layers.0.mlp.fc1.weight"
    ln = "clip.vision_model.encoder.layers.0.layer_norm1.weight"
    assert (by_name[fc1]["lr"], by_name[fc1]["weight_decay"]) == (pytest.approx(1e-5), 0.05)
    assert (by_name[ln]["lr"], by_name[ln]["weight_decay"]) == (pytest.approx(1e-5), 0.0)
    queries = next(n for n in trainable if "queries_embedder" in n or "queries_features" in n)
    assert (by_name[queries]["lr"], by_name[queries]["weight_decay"]) == (1e-4, 0.0)  # nn.Embedding
    assert by_name["classifier.logit_scale"]["weight_decay"] == 0.0
    assert by_name["classifier.void_embedding"]["weight_decay"] == 0.0
    assert by_name["class_embed.weight"]["weight_decay"] == 0.05 and by_name["class_embed.weight"]["lr"] == 1e-4
    assert groups[0]["kind"].startswith("head")  # the logged learning rate is the heads'


def test_warmup_then_poly_schedule():
    solver = SolverConfig(learning_rate=1e-3, lr_scheduler_type="polynomial", warmup_steps=4, poly_power=0.9)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-3}], lr=1e-3)
    sched = make_scheduler(opt, solver, num_training_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4])
    for t in range(4, 20):
        assert lrs[t] == pytest.approx(1e-3 * (1 - (t - 4) / 16) ** 0.9, rel=1e-6), t
    with pytest.raises(ValueError, match="everything is frozen"):
        make_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), solver)


def test_train_job_uses_the_frameworks_solver_by_default(tiny_clip_dir, tmp_path, monkeypatch):
    """The user's call, no solver flag: Mask2Former's solver, warm-up in the lr history, clipping at 0.01."""
    from accelerate import Accelerator

    clipped = []
    original = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *a, **k):
        norm = original(self, parameters, max_norm, *a, **k)
        clipped.append((max_norm, float(norm)))
        return norm

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    metrics = run_training(parse_args("train", [
        "--framework", "mask2former", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path / "r"),
        "--batch_size", "4", "--embedded_size", "16", "--max_eval_examples", "4", "--max_steps", "3",
        "--config_overrides", SMALL]))
    assert metrics["solver"] == FRAMEWORKS["mask2former"].config_class.solver.to_dict()
    assert [m for m, _ in clipped] == [0.01] * 3 and all(n > 0.01 for _, n in clipped)  # the clip binds
    import json

    lrs = json.loads((tmp_path / "r" / "history.json").read_text())["lr"]
    # 10 warm-up steps of 3: the lr after step k is 1e-4 * k / 10
    assert lrs == pytest.approx([1e-5, 2e-5, 3e-5])
    assert not math.isnan(metrics["final_train_loss"])
