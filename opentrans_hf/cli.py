"""``opentrans-hf`` console entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOWERS = ("vision", "text", "all")


def load_model_for_analysis(name: str, tower: str = "vision", revision: str | None = None, seed: int = 0):
    """A model to analyse: a ``make_random_clip`` size name (random-initialised), a local HF model
    directory or a Hub id. For CLIP checkpoints ``tower`` picks the vision tower (default), the text
    tower or the whole ``CLIPModel``; other models load with ``AutoModel``."""
    import torch
    from transformers import AutoConfig, AutoModel, CLIPModel, CLIPTextModel, CLIPVisionModel

    from .hub import load_or_explain
    from .random_clip import CLIP_SIZES, build_random_clip_vision, random_clip_config

    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; choose one of {TOWERS}")
    if name in CLIP_SIZES and not Path(name).exists():
        if tower == "vision":
            return build_random_clip_vision(name, seed)
        config = random_clip_config(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIPTextModel(config.text_config) if tower == "text" else CLIPModel(config)
    config = load_or_explain(name, lambda: AutoConfig.from_pretrained(name, revision=revision), "model config")
    if getattr(config, "model_type", None) == "clip":
        cls = {"vision": CLIPVisionModel, "text": CLIPTextModel, "all": CLIPModel}[tower]
    else:
        cls = AutoModel
    return load_or_explain(name, lambda: cls.from_pretrained(name, revision=revision), "model")


def _cmd_analyze(args) -> int:
    from .spectral import analyze_spectra

    model = load_model_for_analysis(args.model, args.tower, args.revision)
    report = analyze_spectra(
        model,
        estimator=args.estimator,
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        keep_eigenvalues=args.plot is not None,
    )
    print(report.summary())
    if args.out:
        print(f"report written to {report.to_json(args.out)}")
    if args.plot:
        print(f"plot written to {report.plot(args.plot)}")
    return 0


def _patterns(value: str | None):
    """``--target-modules q_proj,v_proj`` -> list (PEFT suffix rule); ``re:<regex>`` -> regex string."""
    if value is None:
        return None
    if value.startswith("re:"):
        return value[3:]
    return [v for v in value.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="opentrans-hf", description=__doc__)
    parser.add_argument("--version", action="version", version=f"opentrans-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="heavy-tail (alpha) analysis of every layer of a model")
    p.add_argument("model", help="local HF model directory, Hub id, or a random CLIP size: tiny, small, vit-b16, vit-l14")
    p.add_argument("--estimator", default="opentrans", choices=["opentrans", "ww"])
    p.add_argument("--tower", default="vision", choices=TOWERS, help="for CLIP checkpoints: which tower to analyse")
    p.add_argument("--target-modules", type=_patterns, default=None,
                   help="comma-separated module names/suffixes, or re:<regex> (PEFT matching rules)")
    p.add_argument("--exclude-modules", type=_patterns, default=None, help="same syntax as --target-modules")
    p.add_argument("--device", default=None, help="device for the eigenvalues, e.g. cuda")
    p.add_argument("--precision", default="float64", choices=["float64", "float32"])
    p.add_argument("--revision", default=None, help="Hub revision")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot (alpha per layer, ESDs) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_analyze)

    from .pruning import cli as prune_cli
    from .training import evaluate_cli, trainer
    from . import pipeline

    p = sub.add_parser("prune", help="semantic-agnostic iterative magnitude pruning of a CLIP image encoder -> mask adapter")
    prune_cli.build_parser(p).set_defaults(func=lambda a: _done(prune_cli.run(a)))
    p = sub.add_parser("train", help="fine-tune an OVS framework (mask + spectral tuning), evaluate zero-shot")
    trainer.build_parser(p).set_defaults(func=lambda a: _done(trainer.run_training(trainer.args_from_namespace(a))))
    p = sub.add_parser("evaluate", help="zero-shot evaluation of a trained OVS model on several datasets")
    evaluate_cli.build_parser(p).set_defaults(func=lambda a: _done(evaluate_cli.run(a)))
    p = sub.add_parser("demo", help="the whole pipeline: analyse, prune, spectral fine-tuning with the mask, evaluate",
                       description=pipeline.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pipeline.build_parser(p).set_defaults(func=lambda a: _done(pipeline.run(a)))
    return parser


def _done(_result) -> int:
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"opentrans-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
