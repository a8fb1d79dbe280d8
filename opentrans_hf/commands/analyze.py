"""Heavy-tail spectral analysis (alpha of the eigenvalue tail) of every layer of a model.

    opentrans-hf analyze openai/clip-vit-base-patch16 --out report.json --plot alpha.png

MODEL is a local HF model directory, a Hub id, or a random CLIP size (tiny, small, vit-b16, vit-l14).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModel, CLIPModel, CLIPTextModel, CLIPVisionModel

from opentrans_hf.commands import check_local_paths, check_output_file
from opentrans_hf.commands.arguments import ProgressArguments
from opentrans_hf.embedded.random_clip import CLIP_SIZES, build_random_clip_vision, random_clip_config
from opentrans_hf.spectral import analyze_spectra
from opentrans_hf.utils.hub import load_or_explain, quiet_loading

TOWERS = ("vision", "text", "all")


@dataclass
class AnalyzeArguments(ProgressArguments):
    model: str = field(kw_only=True, metadata={"help": "local HF model directory, Hub id, or a random CLIP size: tiny, small, "
                                         "vit-b16, vit-l14 (may also be given as the first positional argument)"})
    estimator: Literal["opentrans", "ww"] = field(default="opentrans", metadata={"help": "alpha estimator: the paper's (opentrans) or WeightWatcher 0.7.7's (ww)"})
    tower: Literal["vision", "text", "all"] = field(default="vision", metadata={"help": "for CLIP checkpoints: which tower to analyse"})
    target_modules: str | None = field(default=None, metadata={"help": "comma-separated module names/suffixes, or re:<regex> (PEFT matching rules); default: every Linear/Conv layer"})
    exclude_modules: str | None = field(default=None, metadata={"help": "modules never analysed; same syntax as --target_modules"})
    device: str | None = field(default=None, metadata={"help": "device for the eigenvalues, e.g. cuda (default: cpu)"})
    precision: Literal["float64", "float32"] = field(default="float64", metadata={"help": "eigenvalue precision"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model"})
    out: str | None = field(default=None, metadata={"help": "write the report as JSON here"})
    plot: str | None = field(default=None, metadata={"help": "write a PNG plot (alpha per layer, ESDs) here"})
    print_layers: bool = field(default=True, metadata={"help": "print one line per layer (--no_print_layers: the overview lines only)"})

    def __post_init__(self):
        check_output_file("out", self.out)
        check_output_file("plot", self.plot)
        if self.model not in CLIP_SIZES:
            check_local_paths(self, "model")


ARGUMENTS = AnalyzeArguments


def preprocess_argv(argv: list[str]) -> list[str]:
    """``analyze MODEL ...``: the model may come first, without ``--model``."""
    if argv and not argv[0].startswith("-"):
        return ["--model", argv[0], *argv[1:]]
    return argv


def patterns(value: str | None):
    """``q_proj,v_proj`` -> list (PEFT suffix rule); ``re:<regex>`` -> regex string."""
    if value is None:
        return None
    if value.startswith("re:"):
        return value[3:]
    return [v for v in value.split(",") if v]


def load_model_for_analysis(name: str, tower: str = "vision", revision: str | None = None, seed: int = 0):
    """A model to analyse: a ``make_random_clip`` size name (random-initialised), a local HF model
    directory or a Hub id. For CLIP checkpoints ``tower`` picks the vision tower (default), the text
    tower or the whole ``CLIPModel``; other models load with ``AutoModel``."""
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
    with quiet_loading():  # one tower of a CLIPModel checkpoint: the other tower's keys are expected to be unused
        return load_or_explain(name, lambda: cls.from_pretrained(name, revision=revision, use_safetensors=True), "model")


def run(args: AnalyzeArguments):
    """Analyse, print the summary, write the JSON report / plot if asked; returns the ``SpectralReport``."""
    model = load_model_for_analysis(args.model, args.tower, args.revision)
    report = analyze_spectra(
        model,
        estimator=args.estimator,
        target_modules=patterns(args.target_modules),
        exclude_modules=patterns(args.exclude_modules),
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        keep_eigenvalues=args.plot is not None,
    )
    summary = report.summary()
    print(summary if args.print_layers else "\n".join(summary.splitlines()[:3]))
    if args.out:
        print(f"report written to {report.to_json(args.out)}")
    if args.plot:
        print(f"plot written to {report.plot(args.plot)}")
    return report
