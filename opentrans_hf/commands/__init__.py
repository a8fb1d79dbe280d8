"""The jobs of ``opentrans-hf``, one module each: ``analyze``, ``prune``, ``train``, ``evaluate``, ``demo``,
``pretrain-clip`` (``pretrain_clip.py``), ``reproduce``, ``benchmarks``, ``prepare-dataset``
(``prepare_dataset.py``), ``predict``.

Every job is an arguments dataclass (parsed by ``transformers.HfArgumentParser``: one ``--flag`` per
field, snake_case, with its default and, for enumerations, its choices in ``--help``) and one
``run(args)`` function. The console script (``opentrans-hf``) and ``scripts/*.py`` are thin shells over
them; Python callers build the dataclass and call ``run`` directly::

    from opentrans_hf.commands import train
    metrics = train.run(train.TrainArguments(max_steps=100, freeze_rule="median"))

Nothing in the library imports from this package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from pathlib import Path

from transformers import HfArgumentParser

from opentrans_hf.data.assembly import EMBEDDED
from opentrans_hf.data.splits import held_out_classes
from opentrans_hf.data.vocabulary import benchmark_vocabulary, explicit_vocabulary
from opentrans_hf.embedded.dataset import CLASS_NAMES as EMBEDDED_CLASS_NAMES
from opentrans_hf.models.configuration_ovs import resolve_prompt_templates
from opentrans_hf.training.outputs import OutputDirInUse, OutputLayout, claim_output_dir
from opentrans_hf.utils.hub import check_local_or_hub

COMMANDS = {
    "analyze": "heavy-tail (alpha) analysis of every layer of a model",
    "prune": "semantic-agnostic iterative magnitude pruning of a CLIP image encoder -> mask adapter",
    "train": "fine-tune an OVS framework (mask + spectral tuning), evaluate zero-shot",
    "evaluate": "zero-shot evaluation of a trained OVS model on several datasets",
    "demo": "the whole pipeline: analyse, prune, spectral fine-tuning with the mask, evaluate",
    "pretrain-clip": "pretrain a small CLIP on the embedded captioned images (the jobs' default CLIP)",
    "reproduce": "the paper's two tables in miniature: mask transfer (dense/Random/Ours) and spectral tuning, over seeds",
    "benchmarks": "list the standard open-vocabulary benchmarks (classes, label conventions, Hub ids)",
    "prepare-dataset": "convert a benchmark's official release into a dataset with its conventions and vocabulary",
    "predict": "segment your own images with a trained model: label maps, overlays with a legend, class areas",
}


class ArgumentError(ValueError):
    """A job's arguments are invalid (the CLI exits with status 2 on it, as argparse does)."""


OVERWRITE_HELP = ("remove the outputs an earlier run of this job left in --output_dir before starting (only what "
                  "the job writes there; other files are kept). Without it such a directory is refused, unless "
                  "the run resumes it")


def claim(directory, layout: OutputLayout, *, overwrite: bool, resuming: bool = False,
          resume_hint: str | None = None, state=None) -> list:
    """:func:`~opentrans_hf.training.outputs.claim_output_dir` for a job, at the start of its ``run`` (holding
    the directory's lock, before anything is loaded): a directory holding another run's outputs is an
    :class:`ArgumentError` (exit status 2)."""
    try:
        return claim_output_dir(directory, layout, overwrite=overwrite, resuming=resuming, resume_hint=resume_hint,
                                state=state)
    except OutputDirInUse as err:
        raise ArgumentError(str(err)) from None


def check_at_least_one(args, *names: str) -> None:
    """Every ``--name`` of ``names`` that is given (not None) is >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {value}")


def check_fraction(name: str, value: float | None, *, closed_high: bool = False) -> None:
    """``--name``, when given, is a fraction strictly between 0 and 1 (``closed_high``: 1 allowed)."""
    if value is None:
        return
    ok = math.isfinite(value) and 0 < value and (value <= 1 if closed_high else value < 1)
    if not ok:
        raise ArgumentError(f"--{name} must be in (0, 1{']' if closed_high else ')'}, got {value:g}")


def check_positive(name: str, value: float | None) -> None:
    """``--name``, when given, is a finite number > 0 (a learning rate)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ArgumentError(f"--{name} must be a finite number > 0, got {value:g}")


def check_finite(args, *names: str) -> None:
    """Every ``--name`` of ``names`` that is given (not None) is a finite number (no nan, no inf)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ArgumentError(f"--{name} must be a finite number, got {value:g}")


def check_non_negative(args, *names: str) -> None:
    """Every ``--name`` of ``names`` that is given (not None) is >= 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ArgumentError(f"--{name} must be >= 0, got {value}")


def check_percentage(name: str, value: float | None) -> None:
    """``--name``, when given, is a percentage strictly between 0 and 100."""
    if value is not None and not 0 < value < 100:
        raise ArgumentError(f"--{name} must be in (0, 100), got {value:g}")


MODEL_FLAGS = ("model", "model_name_or_path")
"""The flags that name a model (a directory with config.json, or a Hub id), never an adapter."""

ADAPTER_FLAGS = {"SPARSE_MASK": ("mask adapter", "--mask (train, demo; with the CLIP it was made for)"),
                 "SPECTRAL_TUNING": ("spectral tuning adapter", "--spectral_config (train)")}


def check_local_paths(args, *names: str) -> None:
    """Each ``--name`` of ``names`` (and ``--dataset`` unless it is the embedded one) that is meant as a
    local path exists (:func:`~opentrans_hf.utils.hub.check_local_or_hub`): no Hub retries for a typo.
    A model flag (:data:`MODEL_FLAGS`) must name a model: not one of our adapters, not a run's output
    directory (:func:`check_model_dir`)."""
    for name in names:
        check_local_or_hub(getattr(args, name), f"--{name}")
        if name in MODEL_FLAGS:
            check_model_dir(getattr(args, name), f"--{name}")
    if getattr(args, "dataset", EMBEDDED) != EMBEDDED:
        check_local_or_hub(args.dataset, "--dataset")


def check_model_dir(path, flag: str) -> None:
    """A local directory given as a model holds one: an adapter (``adapter_config.json`` with a peft_type
    of ours and no ``config.json``) is refused saying which flag takes it, and a training run's output
    directory saying where its model is."""
    if path is None or not Path(path).expanduser().is_dir():
        return
    d = Path(path).expanduser()
    if (d / "config.json").is_file():
        return
    if (d / "adapter_config.json").is_file():
        try:
            peft_type = json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
        except (OSError, ValueError, AttributeError):
            peft_type = None
        if peft_type in ADAPTER_FLAGS:
            what, where = ADAPTER_FLAGS[peft_type]
            raise ArgumentError(f"{flag} {path} is a {what} (adapter_config.json peft_type {peft_type}), not a "
                                f"model: pass it as {where}")
    if (d / "model" / "config.json").is_file():
        raise ArgumentError(f"{flag} {path} is a run's output directory, not a model: its model is {d / 'model'}")


def check_output_dir(args, name: str = "output_dir") -> None:
    """``--name`` (a directory a job writes), when given, is not a file, not below one, and can be written
    (the directory, or the nearest existing one above it, where it would be made)."""
    value = getattr(args, name)
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"--{name} {value} is not a directory (a file is there); choose another --{name}")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ArgumentError(f"--{name} {value}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ArgumentError(f"--{name} {value}: {p} is not writable (permission denied); choose another --{name}")
            return


def check_output_file(name: str, value: str | None, *, not_suffixes: tuple[str, ...] = ()) -> None:
    """``--name`` (a file a job writes), when given, is not a directory, has no file among its parents, and
    does not end in one of ``not_suffixes`` (the names of the files the job writes beside it)."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise ArgumentError(f"--{name} {value} is a directory; give a file path to write, e.g. {path / 'results.json'}")
    for p in path.parents:
        if p.exists():
            if not p.is_dir():
                raise ArgumentError(f"--{name} {value}: {p} is a file, not a directory")
            break
    if path.suffix.lower() in not_suffixes:
        raise ArgumentError(f"--{name} {value}: the job writes its {path.suffix} files beside --{name} (same name, "
                            f"that suffix), so --{name} would be overwritten; give a .json path")


def dataset_vocabulary(args) -> tuple[list[str], str] | None:
    """``(class names, where they come from)`` of the train/demo ``--dataset`` when the arguments alone
    tell them (the embedded dataset, ``--benchmark``, ``--class_names``, ``--id2label``); None when only the
    data knows them."""
    try:
        explicit = explicit_vocabulary(class_names=args.class_names, id2label=args.id2label,
                                       flags=("--class_names", "--id2label", "--vocabulary"))
    except (ValueError, OSError) as err:
        raise ArgumentError(str(err)) from err
    if explicit is not None:
        return list(explicit.names), explicit.source
    if getattr(args, "benchmark", None):
        return list(benchmark_vocabulary(args.benchmark).names), f"benchmark {args.benchmark}"
    if args.dataset == EMBEDDED:
        return list(EMBEDDED_CLASS_NAMES), "the embedded dataset"
    return None


def check_holdout_classes(args) -> None:
    """``--holdout_classes`` are classes of ``--dataset``, checked now when the arguments tell its class names
    (:func:`dataset_vocabulary`), else when its data is read (before any training)."""
    if args.holdout_classes is None:
        return
    vocabulary = dataset_vocabulary(args)
    if vocabulary is None:
        return
    names, source = vocabulary
    try:
        held_out_classes(names, args.holdout_classes, [], args.dataset)
    except ValueError as err:
        unknown = [c for c in args.holdout_classes if c not in names and c.lower() != "none"]
        if unknown:
            raise ArgumentError(f"--holdout_classes {', '.join(map(repr, unknown))}: not a class of {source} "
                                f"({', '.join(names)})") from None
        raise ArgumentError(str(err)) from None


def check_prompt_templates(args) -> None:
    """``--prompt_templates``, when given, names a prompt-template set of the frameworks."""
    if getattr(args, "prompt_templates", None):
        try:
            resolve_prompt_templates(args.prompt_templates)
        except ValueError as err:
            raise ArgumentError(f"--prompt_templates: {err}") from None


def command_module(name: str):
    """The module of job ``name`` (it has ``ARGUMENTS``, the dataclass, and ``run``)."""
    if name not in COMMANDS:
        raise ArgumentError(f"unknown command {name!r}; choose one of {sorted(COMMANDS)}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")  # pretrain-clip -> pretrain_clip.py


def build_parser(name: str, prog: str | None = None):
    """The ``HfArgumentParser`` of job ``name``: every field of its arguments dataclass, with defaults."""
    module = command_module(name)
    return _parser_class()(
        module.ARGUMENTS, prog=prog or f"opentrans-hf {name}", description=module.__doc__,
        formatter_class=_HelpFormatter,
    )


def parse_args(name: str, argv: list[str] | None = None, prog: str | None = None):
    """Parse ``argv`` into job ``name``'s arguments dataclass (argparse exits with 2 on unknown flags;
    an invalid value found by the dataclass raises :class:`ArgumentError`)."""
    module = command_module(name)
    argv = list(argv) if argv is not None else None
    if hasattr(module, "preprocess_argv") and argv is not None:
        argv = module.preprocess_argv(argv)
    parser = build_parser(name, prog)
    try:
        args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as err:
        raise ArgumentError(str(err)) from err
    if rest:
        raise ArgumentError(f"unrecognized arguments: {' '.join(rest)} (see {parser.prog} --help)")
    return args


def _parser_class():
    class OneLineErrorParser(HfArgumentParser):
        """Usage errors as one line (the usage itself is one ``--help`` away)."""

        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    return OneLineErrorParser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help; the job's docstring as written."""
