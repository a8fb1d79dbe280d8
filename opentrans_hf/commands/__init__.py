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

from transformers import HfArgumentParser

from opentrans_hf.data.assembly import EMBEDDED
from opentrans_hf.models.configuration_ovs import resolve_prompt_templates
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


def check_at_least_one(args, *names: str) -> None:
    """Every ``--name`` of ``names`` that is given (not None) is >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {value}")


def check_percentage(name: str, value: float | None) -> None:
    """``--name``, when given, is a percentage strictly between 0 and 100."""
    if value is not None and not 0 < value < 100:
        raise ArgumentError(f"--{name} must be in (0, 100), got {value:g}")


def check_local_paths(args, *names: str) -> None:
    """Each ``--name`` of ``names`` (and ``--dataset`` unless it is the embedded one) that is meant as a
    local path exists (:func:`~opentrans_hf.utils.hub.check_local_or_hub`): no Hub retries for a typo."""
    for name in names:
        check_local_or_hub(getattr(args, name), f"--{name}")
    if getattr(args, "dataset", EMBEDDED) != EMBEDDED:
        check_local_or_hub(args.dataset, "--dataset")


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
