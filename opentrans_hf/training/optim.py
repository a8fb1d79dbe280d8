"""The solver of a training run: the framework's :class:`~opentrans_hf.models.configuration_ovs.SolverConfig`
defaults with the job's flags on top, AdamW parameter groups (backbone learning-rate multiplier, weight decay
per kind of parameter, as detectron2's ``build_optimizer`` for Mask2Former / FC-CLIP), the warm-up + schedule,
and gradient clipping."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import get_scheduler

from opentrans_hf.models.configuration_ovs import SolverConfig

SOLVER_FLAGS = {"learning_rate": "learning_rate", "backbone_lr_multiplier": "backbone_multiplier",
                "weight_decay": "weight_decay", "weight_decay_norm": "weight_decay_norm",
                "weight_decay_embed": "weight_decay_embed", "lr_scheduler_type": "lr_scheduler_type",
                "warmup_steps": "warmup_steps", "poly_power": "poly_power", "max_grad_norm": "max_grad_norm"}
"""Train-job flag -> solver field; a flag left at None takes the framework's default."""

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)


def resolve_solver(framework_cls, args) -> SolverConfig:
    """``framework_cls.config_class.solver`` with every solver flag of ``args`` that is set; ``--max_grad_norm 0``
    turns clipping off. A bad value is a ValueError naming the setting."""
    changes = {field: getattr(args, flag, None) for flag, field in SOLVER_FLAGS.items()}
    clipping_off = changes.get("max_grad_norm") == 0
    if clipping_off:
        changes["max_grad_norm"] = None
    solver = framework_cls.config_class.solver.replace(**changes)
    return dataclasses.replace(solver, max_grad_norm=None) if clipping_off else solver


def is_backbone(name: str) -> bool:
    """A parameter of the CLIP inside a framework (``clip.``, also below a wrapper's prefix)."""
    return name.startswith("clip.") or ".clip." in name


def parameter_groups(model: nn.Module, solver: SolverConfig) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters: learning rate ``solver.learning_rate`` (times
    ``backbone_multiplier`` for the CLIP's), weight decay ``weight_decay`` except ``weight_decay_norm`` for
    normalisation layers and ``weight_decay_embed`` for embeddings (``nn.Embedding`` weights, scalar
    parameters such as logit scales, the learned void embedding). Heads come first (the first group's learning
    rate is the one logged). Each group carries ``names`` (the parameters' names) and ``kind``."""
    kinds: dict[tuple, list] = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            backbone = is_backbone(name)
            if isinstance(module, NORM_TYPES):
                kind, wd = "norm", solver.weight_decay_norm
            elif isinstance(module, nn.Embedding) or p.dim() == 0 or pname == "void_embedding":
                kind, wd = "embed", solver.weight_decay_embed
            else:
                kind, wd = "weight", solver.weight_decay
            lr = solver.learning_rate * (solver.backbone_multiplier if backbone else 1.0)
            key = (backbone, kind, lr, wd)
            group = kinds.setdefault(key, {"params": [], "names": [], "lr": lr, "weight_decay": wd,
                                           "kind": ("backbone " if backbone else "head ") + kind})
            group["params"].append(p)
            group["names"].append(name)
    return [kinds[k] for k in sorted(kinds, key=lambda k: (k[0], k[1]))]


def make_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, solver)
    if not groups:
        raise ValueError("no trainable parameter: everything is frozen (check the framework's freeze settings, "
                         "--freeze_rule / --spectral_config)")
    return torch.optim.AdamW(groups, lr=solver.learning_rate, weight_decay=solver.weight_decay)


def make_scheduler(optimizer, solver: SolverConfig, num_training_steps: int, num_processes: int = 1):
    """transformers' ``get_scheduler`` with the solver's warm-up (``polynomial``: to 0 with ``poly_power``).

    Accelerate's prepared scheduler steps once per process on every optimizer step (its convention), so the
    schedule is laid out in process-steps: warm-up and decay span the given optimizer steps."""
    extra = {"power": solver.poly_power, "lr_end": 0.0} if solver.lr_scheduler_type == "polynomial" else None
    return get_scheduler(solver.lr_scheduler_type, optimizer, num_warmup_steps=solver.warmup_steps * num_processes,
                         num_training_steps=num_training_steps * num_processes, scheduler_specific_kwargs=extra)
