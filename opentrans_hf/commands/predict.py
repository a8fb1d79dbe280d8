"""Segment your own images with a trained OVS model, in any vocabulary:

    opentrans-hf predict --model runs/demo/train/model --classes "sky,road|street,car" \\
        --output_dir predictions photos/*.jpg
    opentrans-hf predict --model runs/demo/train/model --benchmark ade150 --output_dir out img.png

--classes is one string: classes separated by commas, synonyms of one class separated by '|' (the class
is scored by the best of its names; it is shown and recorded under its first name). --benchmark NAME
takes a standard benchmark's vocabulary with its synonyms instead (`opentrans-hf benchmarks` lists them).

Written into --output_dir, per image: <stem>.labels.png (the label map at the image's size, pixel =
class index; 8-bit for up to 255 classes with void = 255, 16-bit otherwise with void = 65535),
<stem>.overlay.png (the image blended with a fixed per-class palette, and a legend of the classes
present with their share of the image); and areas.json for all images ({"model", "classes",
"images": {path: {"size": [H, W], "areas": {class: {"pixels", "fraction"}}, ...}}}, classes sorted by
area, absent ones left out). Images whose stems collide (a/x.jpg, b/x.jpg) get distinct names (a__x.jpg,
b__x.jpg), listed in areas.json. Every image is read before anything is predicted: an unreadable one
stops the job with nothing written. Without --allow_void every pixel gets one of the classes.
--output_dir is the run's own: one holding an earlier predict run's files (label maps, overlays,
areas.json) is refused, unless --overwrite_output_dir, which removes those files first (others stay).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoModel

from opentrans_hf.commands import (
    ArgumentError,
    check_at_least_one,
    check_local_paths,
    check_output_dir,
    check_prompt_templates,
    claim,
)
from opentrans_hf.data.benchmarks import get_benchmark
from opentrans_hf.models import FRAMEWORKS
from opentrans_hf.models.classifier import display_name
from opentrans_hf.pipelines.inference import AREAS_FILE, check_images, parse_classes, predict_images
from opentrans_hf.training.divergence import check_finite_weights
from opentrans_hf.training.outputs import OutputLayout
from opentrans_hf.utils.hub import load_or_explain
from opentrans_hf.utils.locking import output_dir_lock


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "trained OVS model: output_dir/model of a training run, or a Hub id"})
    output_dir: str = field(metadata={"help": "where the label maps, overlays and areas.json are written (created if missing)"})
    images: list[str] = field(default_factory=list, metadata={"help": "image files (also accepted as bare trailing arguments: ... --output_dir OUT a.jpg b.png)"})
    classes: str | None = field(default=None, metadata={"help": "the vocabulary, one string: classes separated by ',', synonyms of a class by '|', e.g. 'sky,road|street,car'"})
    benchmark: str | None = field(default=None, metadata={"help": "use this benchmark's vocabulary (with its synonyms) instead of --classes, e.g. ade150, voc21"})
    batch_size: int = field(default=4, metadata={"help": "images per forward pass"})
    allow_void: bool = field(default=False, metadata={"help": "let the model's void/background embedding leave pixels unlabelled (255 / 65535); default: every pixel gets a class"})
    alpha: float = field(default=0.5, metadata={"help": "opacity of the class colours in the overlays, 0..1"})
    prompt_templates: str | None = field(default=None, metadata={"help": "score the class names with this prompt-template set instead of the model's: 'fcclip' (FC-CLIP's 14 evaluation templates) or 'default' (the 4 the frameworks start with)"})
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "remove the label maps, overlays and areas.json an earlier predict run left in --output_dir before starting (other files are kept); without it such a directory is refused"})

    def __post_init__(self):
        check_prompt_templates(self)
        check_at_least_one(self, "batch_size")
        if not 0.0 <= self.alpha <= 1.0:
            raise ArgumentError(f"--alpha must be in [0, 1], got {self.alpha:g}")
        self.class_prompts()  # a bad vocabulary fails here, before any model is loaded
        if not self.images:
            raise ArgumentError("no images given: list image files after the flags, e.g. ... --output_dir out a.jpg b.png")
        seen = set()
        for image in self.images:
            p = Path(image)
            if not p.exists():
                raise FileNotFoundError(f"image {image}: no such file")
            if p.is_dir():
                raise ArgumentError(f"image {image} is a directory; give the image files (e.g. {image}/*.jpg)")
            key = p.resolve()
            if key in seen:
                raise ArgumentError(f"image {image} is given twice")
            seen.add(key)
        check_output_dir(self)
        check_local_paths(self, "model")

    def class_prompts(self) -> list[str | tuple[str, ...]]:
        """The classes to predict: a name or a tuple of synonyms each (``--classes`` or ``--benchmark``)."""
        if (self.classes is None) == (self.benchmark is None):
            raise ArgumentError("give exactly one of --classes (e.g. 'sky,road|street,car') and --benchmark (e.g. ade150)"
                                + ("; both were given" if self.classes is not None else ""))
        if self.classes is not None:
            try:
                return parse_classes(self.classes)
            except ValueError as err:
                raise ArgumentError(f"--classes: {err}") from err
        try:
            bench = get_benchmark(self.benchmark)
        except ValueError as err:
            raise ArgumentError(f"--benchmark: {err}") from err
        prompts = [tuple(p) for p in bench.class_prompts]
        return [p[0] if len(p) == 1 else p for p in prompts]

    def class_names(self) -> list[str]:
        """The classes' display names: the first synonym of each (a benchmark's unique class names)."""
        if self.benchmark is not None:
            return list(get_benchmark(self.benchmark).class_names)
        return [display_name(c) for c in self.class_prompts()]


ARGUMENTS = PredictArguments

PREDICT_LAYOUT = OutputLayout("predict", (AREAS_FILE, "*.labels.png", "*.overlay.png"))
"""What a predict run writes into its output directory."""

_BOOL_VALUES = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def preprocess_argv(argv: list[str]) -> list[str]:
    """Bare arguments (not flags, not a flag's value) are images: ``... --output_dir out a.jpg b.jpg``
    becomes ``... --output_dir out --images a.jpg b.jpg``. Everything after ``--`` is an image too."""
    kinds = {}
    for f in fields(PredictArguments):
        kinds[f.name] = "bool" if f.type in (bool, "bool") else "list" if str(f.type).startswith("list") else "value"
    flags, images, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            images.extend(argv[i + 1:])
            break
        if not token.startswith("-") or token == "-":
            images.append(token)
            i += 1
            continue
        name, has_value = token.lstrip("-").split("=", 1)[0].replace("-", "_"), "=" in token
        kind = kinds.get(name)
        if name == "images" and not has_value:
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                images.append(argv[i])
                i += 1
            continue
        flags.append(token)
        i += 1
        if has_value or kind is None:  # --flag=value, or an unknown flag (the parser reports it)
            continue
        if kind == "bool":
            if i < len(argv) and argv[i].lower() in _BOOL_VALUES:
                flags.append(argv[i])
                i += 1
        elif i < len(argv):
            flags.append(argv[i])
            i += 1
    return flags + (["--images", *images] if images else [])


def run(args: PredictArguments) -> dict:
    """Segment the images into ``args.output_dir``: a directory of its own (an earlier predict run's files
    there are refused, or removed first with ``--overwrite_output_dir``), held locked for the run."""
    with output_dir_lock(args.output_dir, None, "predict"):
        claim(args.output_dir, PREDICT_LAYOUT, overwrite=args.overwrite_output_dir)
        return _predict(args)


def _predict(args: PredictArguments) -> dict:
    classes = args.class_prompts()
    check_images(args.images)  # every image readable before the model loads and anything is written
    model = load_or_explain(args.model, lambda: AutoModel.from_pretrained(args.model), "OVS model")
    if not hasattr(model, "predict"):
        raise ValueError(f"{args.model} is a {type(model).__name__}, not an opentrans-hf OVS framework "
                         f"({', '.join(FRAMEWORKS)})")
    check_finite_weights(model, f"model {args.model}")
    if args.prompt_templates:
        model.set_prompt_templates(args.prompt_templates)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def progress(done: int, total: int) -> None:
        if sys.stdout.isatty():
            print(f"\r{done}/{total} images", end="\n" if done == total else "", flush=True)

    record = predict_images(model, args.images, classes, args.output_dir, names=args.class_names(),
                            batch_size=args.batch_size,
                            allow_void=args.allow_void, alpha=args.alpha, model_name=args.model,
                            check_first=False, progress=progress)
    n = len(record["images"])
    print(f"{n} image{'s' * (n != 1)} segmented into {len(classes)} classes: label maps, overlays and "
          f"{Path(args.output_dir) / 'areas.json'} written")
    return record
