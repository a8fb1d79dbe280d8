"""The jobs' arguments: every job keeps exactly its flags and defaults, and a field shared by several jobs is
declared once, in its group (opentrans_hf.commands.arguments), unless a job means something else by it."""

import dataclasses
import inspect

import pytest

from opentrans_hf.commands import COMMANDS, arguments, build_parser, command_module

REQUIRED = object()

# every job's flags with their defaults (REQUIRED: a flag without a default that the parser requires)
FLAGS = {
    "analyze": {"device": None, "estimator": 'opentrans', "exclude_modules": None, "model": REQUIRED, "no_progress": False, "out": None, "plot": None, "precision": 'float64', "print_layers": True, "revision": None, "target_modules": None, "tower": 'vision'},
    "benchmarks": {"json": False, "names": None},
    "demo": {"batch_size": 8, "benchmark": None, "class_names": None, "config_overrides": None, "dataset": 'embedded', "embedded_size": 192, "estimator": 'opentrans', "eval_datasets": [], "framework": 'deeplabv3', "freeze_rule": 'median', "holdout_classes": None, "id2label": None, "ignore_index": None, "image_column": None, "label_column": None, "learning_rate": 0.001, "max_eval_examples": None, "max_steps": 500, "model_name_or_path": None, "no_baselines": False, "no_resume": False, "output_dir": 'runs/demo', "prune_rate": 0.1, "prune_scope": 'layerwise', "prune_steps_per_round": 10, "reduce_labels": False, "seed": 0, "spectral_warmup_steps": 0, "target_sparsity": 0.9, "validation_split_percentage": None, "overwrite_output_dir": False},
    "evaluate": {"batch_size": 8, "benchmark": None, "class_names": None, "datasets": None, "embedded_size": 192, "eval_resize": None, "id2label": None, "ignore_index": None, "image_column": None, "image_size": None, "label_column": None, "max_examples": None, "max_size": None, "model": REQUIRED, "out": None, "prompt_templates": None, "reduce_labels": False, "seed": 0, "shortest_side": None, "sliding_stride": None},
    "predict": {"allow_void": False, "alpha": 0.5, "batch_size": 4, "benchmark": None, "classes": None, "device": None, "images": [], "model": REQUIRED, "output_dir": REQUIRED, "prompt_templates": None, "overwrite_output_dir": False},
    "prepare-dataset": {"benchmark": REQUIRED, "max_examples": None, "no_progress": False, "output_dir": REQUIRED, "overwrite": False, "raw_dir": REQUIRED, "splits": ['validation']},
    "pretrain-clip": {"batch_size": None, "learning_rate": None, "max_steps": None, "no_progress": False, "num_examples": None, "output_dir": None, "seed": 0, "size": 'small', "overwrite_output_dir": False},
    "prune": {"batch_size": 8, "dataset": 'embedded', "embedded_size": 192, "hub_model_id": None, "ignore_checkpoint_mismatch": False, "image_column": None, "label_column": None, "learning_rate": 1e-05, "max_layer_sparsity": 0.99, "model_name_or_path": None, "no_region_loss": False, "no_resume": False, "num_rounds": None, "output_dir": 'runs/prune', "push_to_hub": False, "rate": 0.1, "scope": 'global', "seed": 0, "split": 'train', "steps_per_round": 5000, "target_sparsity": None, "validation_split_percentage": None, "overwrite_output_dir": False},
    "reproduce": {"batch_size": 8, "embedded_size": 192, "frameworks": ['deeplabv3', 'mask2former', 'fcclip'], "learning_rate": 0.001, "max_eval_examples": None, "max_steps": None, "model_name_or_path": None, "no_resume": False, "output_dir": 'runs/reproduce', "prune_learning_rate": 0.0001, "prune_rate": None, "prune_scope": 'layerwise', "prune_steps_per_round": None, "quick": False, "seeds": [0, 1, 2], "spectral_warmup_steps": None, "tables": [1, 2], "target_sparsity": 0.9, "overwrite_output_dir": False},
    "train": {"backbone_lr_multiplier": None, "batch_size": 8, "benchmark": None, "checkpointing_steps": None, "class_names": None, "config_overrides": None, "dataset": 'embedded', "embedded_size": 192, "eval_datasets": [], "eval_split": None, "eval_steps": None, "framework": 'deeplabv3', "freeze_rule": None, "gradient_accumulation_steps": 1, "holdout_classes": None, "hub_model_id": None, "hub_private_repo": False, "hub_revision": None, "hub_token": None, "id2label": None, "ignore_checkpoint_mismatch": False, "ignore_index": None, "image_column": None, "image_size": None, "label_column": None, "learning_rate": None, "lr_scheduler_type": None, "mask": None, "max_eval_examples": None, "max_grad_norm": None, "max_steps": -1, "mixed_precision": 'no', "model_name_or_path": None, "num_epochs": 3.0, "output_dir": 'runs/train', "poly_power": None, "push_to_hub": False, "reduce_labels": False, "report_to": None, "resume_from_checkpoint": None, "seed": 0, "spectral_config": None, "spectral_warmup_steps": 0, "train_split": 'train', "validation_split_percentage": None, "warmup_steps": None, "weight_decay": None, "weight_decay_embed": None, "weight_decay_norm": None, "overwrite_output_dir": False},}

GROUPS = (arguments.ClipArguments, arguments.FrameworkArguments, arguments.DatasetArguments,
          arguments.EmbeddedArguments, arguments.RunArguments, arguments.ProgressArguments)
# a field of a group a job takes that the job declares again because it means something else there (another help)
OWN_MEANING = {("evaluate", "seed")}


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_job_keeps_its_flags_and_defaults(name):
    assert set(FLAGS) == set(COMMANDS)
    assert _defaults(command_module(name).ARGUMENTS) == FLAGS[name]
    parser = build_parser(name)
    required = {a.dest for a in parser._actions if a.option_strings and a.required}
    assert required == {k for k, v in FLAGS[name].items() if v is REQUIRED}
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {f"--{k}" for k in FLAGS[name]} <= flags


def test_a_shared_field_is_declared_once_in_its_group():
    owner = {}
    for group in GROUPS:
        for field_name in inspect.get_annotations(group):
            assert field_name not in owner, f"{field_name} declared by {owner.get(field_name)} and {group.__name__}"
            owner[field_name] = group.__name__
    for name in COMMANDS:
        cls = command_module(name).ARGUMENTS
        taken = {f for f, group in owner.items() if issubclass(cls, getattr(arguments, group))}
        again = {f for f in inspect.get_annotations(cls) if f in taken}
        inherited = {f.name for f in dataclasses.fields(cls)} & taken
        assert again == {f for job, f in OWN_MEANING if job == name}, f"{name} declares {again} again"
        for field_name in inherited - again:  # the group's field, with the group's default and help
            group = getattr(arguments, owner[field_name])
            mine = {f.name: f for f in dataclasses.fields(cls)}[field_name]
            theirs = {f.name: f for f in dataclasses.fields(group)}[field_name]
            assert mine.metadata["help"] == theirs.metadata["help"]
    # the jobs that read the same data take the same groups
    for name in ("train", "demo"):
        assert issubclass(command_module(name).ARGUMENTS, arguments.DatasetArguments)
        assert issubclass(command_module(name).ARGUMENTS, arguments.FrameworkArguments)
    for name in ("train", "demo", "prune", "reproduce"):
        assert issubclass(command_module(name).ARGUMENTS, arguments.ClipArguments)


def test_required_fields_stay_required_by_keyword():
    from opentrans_hf.commands.evaluate import EvaluateArguments

    with pytest.raises(TypeError):
        EvaluateArguments()
    assert EvaluateArguments(model="m", datasets=["embedded"]).batch_size == 8
