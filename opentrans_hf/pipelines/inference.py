"""Segment your own images with a trained OVS model and write the results as files.

:func:`predict_images` runs the ``open-vocabulary-segmentation`` pipeline on image files (or in-memory images) with any vocabulary
and writes, per image, into one output directory:

* ``<stem>.labels.png``: the label map at the image's own size, pixel = class index; mode ``L`` for up
  to 255 classes (void/unlabelled = 255), 16-bit (``I;16``) otherwise (void = 65535);
* ``<stem>.overlay.png``: the image blended with a fixed per-class palette (:func:`label_palette`), with
  a legend strip underneath listing the classes present, their colour and their share of the image
  (:func:`overlay_with_legend`);

and one ``areas.json`` for all images (:func:`class_areas`): ``{"model": ..., "classes": [...],
"images": {"<path>": {"size": [H, W], "areas": {"<class>": {"pixels": n, "fraction": f}}, ...}}}``,
classes absent from an image left out, the others sorted by area (largest first).

A class is a name or a tuple of synonyms (scored together, the class's score being the best of its
names); its display name is its first name. Every file is written atomically (a temporary file renamed
into place). Images are read, and every one of them checked, before anything is predicted or written
(:func:`check_images`): one unreadable file stops the job with an error naming it and nothing written.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from opentrans_hf.data.transforms import load_image, to_rgb  # noqa: F401 - load_image/to_rgb: public here since 0.1
from opentrans_hf.models.classifier import check_class_names, display_name
from opentrans_hf.pipelines.segmentation import VOID, segmentation_pipeline
from opentrans_hf.utils.io import atomic_write_text, atomic_write_with

if TYPE_CHECKING:
    from PIL import Image

AREAS_FILE = "areas.json"
VOID_COLOUR = (128, 128, 128)
"""The legend swatch of void/unlabelled pixels (the overlay leaves them uncoloured)."""


# --------------------------------------------------------------------------------------------------- classes
def parse_classes(text: str) -> list[str | tuple[str, ...]]:
    """``"sky,road|street,car"`` -> ``["sky", ("road", "street"), "car"]``: classes separated by commas,
    synonyms of one class by ``|`` (a class with one name stays a plain string). Empty classes or names,
    and a name given to two classes, are a ``ValueError`` saying which."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the class list is empty: give classes separated by commas, e.g. 'sky,road|street,car'")
    classes, owner = [], {}
    for i, part in enumerate(text.split(",")):
        if not part.strip():
            raise ValueError(f"class {i + 1} of {text!r} is empty (two commas in a row, or a comma at an end?)")
        names = [n.strip() for n in part.split("|")]
        if not all(names):
            raise ValueError(f"class {i + 1} of {text!r} ({part.strip()!r}) has an empty synonym (a stray '|'?)")
        names = list(dict.fromkeys(names))  # a synonym repeated within one class counts once
        for n in names:
            if n in owner:
                raise ValueError(f"the name {n!r} is given to classes {owner[n] + 1} and {i + 1} of {text!r}: "
                                 "each name may name one class only")
            owner[n] = i
        classes.append(names[0] if len(names) == 1 else tuple(names))
    return classes


# --------------------------------------------------------------------------------------------------- palette
@lru_cache(maxsize=8)
def _palette(k: int) -> bytes:
    colours, seen, n = [], set(), 0
    while len(colours) < k:
        h = (n * 0.6180339887498949) % 1.0  # golden-ratio hue steps: neighbouring classes far apart
        s = (0.9, 0.65, 0.8)[n % 3]
        v = (0.95, 0.75, 0.55)[(n // 3) % 3]
        rgb = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))
        n += 1
        if rgb in seen or rgb[0] == rgb[1] == rgb[2]:  # distinct colours, never a grey (void, text)
            continue
        seen.add(rgb)
        colours.append(rgb)
    return bytes(np.array(colours, dtype=np.uint8).reshape(-1)) if colours else b""


def label_palette(k: int) -> np.ndarray:
    """``(k, 3)`` uint8 RGB colours, one per class index: fixed (class ``i`` has the same colour whatever
    ``k``), distinct, saturated (no greys, which mark void pixels and legend text)."""
    if k < 0:
        raise ValueError(f"the number of classes must be >= 0, got {k}")
    return np.frombuffer(_palette(int(k)), dtype=np.uint8).reshape(-1, 3).copy()


# --------------------------------------------------------------------------------------------------- areas
def _labels_array(labels) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"a label map must be 2-D (H, W), got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def class_areas(labels, names: Sequence[str], ignore: int | None = None) -> dict:
    """``{name: {"pixels": n, "fraction": f}}`` of the classes present in ``labels`` (values index
    ``names``), largest first (ties: class order); ``fraction`` is of all the map's pixels. ``ignore``
    (void) pixels are counted by no class; any other value outside the classes is an error."""
    arr = _labels_array(labels)
    total = arr.size
    valid = arr != ignore if ignore is not None else np.ones(arr.shape, dtype=bool)
    values = arr[valid]
    if values.size and (values.min() < 0 or values.max() >= len(names)):
        bad = int(values[(values < 0) | (values >= len(names))][0])
        raise ValueError(f"label value {bad} is outside the {len(names)} classes and is not the void value {ignore}")
    counts = np.bincount(values, minlength=len(names)) if values.size else np.zeros(len(names), dtype=np.int64)
    order = sorted((i for i in range(len(names)) if counts[i]), key=lambda i: (-int(counts[i]), i))
    return {names[i]: {"pixels": int(counts[i]), "fraction": float(counts[i]) / total if total else 0.0} for i in order}


# --------------------------------------------------------------------------------------------------- images
def check_images(paths: Sequence) -> None:
    """Read every image file of ``paths`` fully (and let it go); a ``ValueError`` naming each one that
    cannot be read (one line), before any work is done."""
    problems = []
    for p in paths:
        if isinstance(p, (str, os.PathLike)):
            try:
                load_image(p)
            except ValueError as err:
                problems.append(str(err))
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} images cannot be read (nothing was written): " + "; ".join(problems))


def output_stems(images: Sequence) -> list[str]:
    """A distinct file stem per image: its file stem; where stems collide (``a/x.jpg``, ``b/x.png``;
    compared case-insensitively, as some file systems do) its file name, then its parent folders and file
    name joined by ``__`` (``a__x.jpg``), as many folders as it takes; a number as the last resort.
    In-memory images are ``image<i>``."""
    candidates = []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            p = Path(os.path.abspath(im))
            parents = [x for x in reversed(p.parent.parts) if x != p.anchor]
            candidates.append([p.stem, p.name,
                               *["__".join([*reversed(parents[:d]), p.name]) for d in range(1, len(parents) + 1)]])
        else:
            candidates.append([f"image{i}"])
    level = [0] * len(candidates)
    while True:
        names = [c[lv] for c, lv in zip(candidates, level)]
        keys = [n.casefold() for n in names]
        clash = [i for i, k in enumerate(keys) if keys.count(k) > 1 and level[i] + 1 < len(candidates[i])]
        if not clash:
            break
        for i in clash:
            level[i] += 1
    stems, used = [], set()
    for name in names:
        stem, n = name, 2
        while stem.casefold() in used:
            stem, n = f"{name}-{n}", n + 1
        used.add(stem.casefold())
        stems.append(stem)
    return stems


# --------------------------------------------------------------------------------------------------- drawing
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _drawable(font, text: str) -> str:
    try:
        font.getbbox(text)
        return text
    except UnicodeError:  # the bitmap font knows latin-1 only
        return text.encode("latin-1", "replace").decode("latin-1")


def _percent(fraction: float) -> str:
    return "<0.1%" if 0 < fraction < 0.0005 else f"{100 * fraction:.1f}%"


def legend_entries(labels, names: Sequence[str], ignore: int | None = None) -> list[tuple[int | None, str, int, float]]:
    """``(class index, name, pixels, fraction)`` of every class present, largest first, then void
    (index None, name "void") when ``ignore`` pixels are present: the rows of the overlay's legend."""
    arr = _labels_array(labels)
    index = {n: i for i, n in enumerate(names)}
    rows = [(index[n], n, a["pixels"], a["fraction"]) for n, a in class_areas(arr, names, ignore).items()]
    if ignore is not None:
        void = int((arr == ignore).sum())
        if void:
            rows.append((None, "void", void, void / arr.size))
    return rows


def overlay_with_legend(image, labels, names: Sequence[str], *, ignore: int | None = None, alpha: float = 0.5,
                        palette: np.ndarray | None = None) -> "Image.Image":
    """The image (RGB, its own size) blended with the class colours (``alpha``: the colours' opacity;
    void pixels keep the image), with a white legend strip underneath: one swatch + "name  12.3%" per
    class present (:func:`legend_entries`), flowing left to right. The result is RGB, as wide as the
    image (wider only if one legend entry needs it) and the image's height plus the legend's."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image)
    arr = _labels_array(labels)
    w, h = rgb.size
    if arr.shape != (h, w):
        raise ValueError(f"the label map is {arr.shape} but the image is {(h, w)} (H, W)")
    palette = label_palette(len(names)) if palette is None else np.asarray(palette, dtype=np.uint8)
    pixels = np.asarray(rgb).astype(np.float32)
    labelled = (arr >= 0) & (arr < len(names))
    if ignore is not None:
        labelled &= arr != ignore
    colours = palette[np.where(labelled, arr, 0)].astype(np.float32)
    blended = np.where(labelled[..., None], (1 - alpha) * pixels + alpha * colours, pixels)
    top = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")

    font = _font(max(12, min(48, round(max(w, h) / 50))))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(probe.textbbox((0, 0), "Ag%", font=font)[3], 8)
    sw, pad, gap = line_h, max(4, line_h // 3), max(8, line_h)
    items = []
    for idx, name, _, fraction in legend_entries(arr, names, ignore):
        text = _drawable(font, f"{name}  {_percent(fraction)}")
        tw = probe.textbbox((0, 0), text, font=font)[2]
        items.append((VOID_COLOUR if idx is None else tuple(int(c) for c in palette[idx]), text, sw + pad + tw))
    width = max(w, max((iw for *_, iw in items), default=0) + 2 * pad)
    placed, x, y = [], pad, pad  # flow layout: (colour, text, x, y)
    for colour, text, iw in items:
        if x > pad and x + iw > width - pad:
            x, y = pad, y + line_h + pad
        placed.append((colour, text, x, y))
        x += iw + gap
    legend_h = (y + line_h + pad) if items else 0
    canvas = Image.new("RGB", (width, h + legend_h), (255, 255, 255))
    canvas.paste(top, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for colour, text, x, y in placed:
        draw.rectangle([x, h + y, x + sw - 1, h + y + sw - 1], fill=colour)
        draw.text((x + sw + pad, h + y), text, fill=(0, 0, 0), font=font)
    return canvas


# --------------------------------------------------------------------------------------------------- writing
def label_image(labels, num_classes: int, ignore: int | None = None) -> "Image.Image":
    """The label map as a PNG-ready image: mode ``L`` for up to 255 classes (void = 255), 16-bit
    ``I;16`` otherwise (void = 65535)."""
    if num_classes > 65535:
        raise ValueError(f"{num_classes} classes do not fit a 16-bit label map (at most 65535)")
    arr = _labels_array(labels)
    void_value, dtype = (255, np.uint8) if num_classes <= 255 else (65535, np.uint16)
    void = (arr == ignore) if ignore is not None else np.zeros(arr.shape, dtype=bool)
    bad = ~void & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        raise ValueError(f"label value {int(arr[bad][0])} is outside the {num_classes} classes and is not the void value")
    out = np.where(void, void_value, arr).astype(dtype)
    return Image.fromarray(out)  # uint8 -> "L", uint16 -> "I;16"


def save_png(image, path: str | Path) -> Path:
    """Write a PIL image as PNG atomically (a temporary file beside ``path``, then ``os.replace``)."""
    return atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def predict_images(model, images: Sequence, classes: Sequence, output_dir: str | Path, *, batch_size: int = 4,
                   names: Sequence[str] | None = None, allow_void: bool = False, alpha: float = 0.5,
                   model_name: str | None = None, check_first: bool = True, progress=None) -> dict:
    """Segment ``images`` (file paths and/or in-memory PIL images / arrays) into ``classes`` (names or
    tuples of synonyms) with the ``open-vocabulary-segmentation`` pipeline (the model's processor: the same
    pre- and post-processing as ``model.predict``) and write, into ``output_dir``, a label PNG and an overlay
    per image (``<stem>.labels.png``, ``<stem>.overlay.png``; colliding stems disambiguated by
    :func:`output_stems`) and ``areas.json`` for all. Returns the ``areas.json`` record.

    ``names``: the classes' display names (distinct; default: each class's first name), e.g. a
    benchmark's ``class_names`` where two of its classes share a first synonym.

    ``allow_void`` False: every pixel gets a class; True: pixels the model's void embedding wins are
    void (255 in 8-bit, 65535 in 16-bit label maps; counted apart as ``"void"``). With ``check_first``
    every image file is read before the first prediction, so a bad one stops the job with nothing
    written (:func:`check_images`). ``progress``: an optional ``callable(done, total)``."""
    classes, names, images, keys = _checked_inputs(classes, names, images, batch_size, alpha)
    if check_first:
        check_images(images)
    k = len(classes)
    void_out = 255 if k <= 255 else 65535
    palette = label_palette(k)
    stems = output_stems(images)
    out = Path(output_dir)
    record = {"model": model_name, "classes": names,
              "prompts": {n: list(c) for n, c in zip(names, classes) if not isinstance(c, str) or c != n},
              "allow_void": bool(allow_void), "void_value": void_out, "images": {}}
    pipe = segmentation_pipeline(model, batch_size=batch_size)
    for start in range(0, len(images), batch_size):
        chunk = [load_image(im) for im in images[start: start + batch_size]]
        preds = pipe(chunk, candidate_labels=list(classes), allow_void=allow_void, return_label_map=True)
        for j, (rgb, pred) in enumerate(zip(chunk, preds)):
            i = start + j
            record["images"][keys[i]] = _write_prediction(rgb, pred, out, stems[i], names, palette, alpha,
                                                          VOID if allow_void else None)
            if progress is not None:
                progress(i + 1, len(images))
    atomic_write_text(out / AREAS_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def _checked_inputs(classes, names, images, batch_size: int, alpha: float):
    """:func:`predict_images`' arguments checked -> ``(classes, display names, images, their keys in
    areas.json)``."""
    classes = check_class_names(classes)
    names = [display_name(c) for c in classes] if names is None else [str(n) for n in names]
    if len(names) != len(classes):
        raise ValueError(f"{len(names)} names for {len(classes)} classes")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"classes share a display name: {dup}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    keys = [str(im) if isinstance(im, (str, os.PathLike)) else f"images[{i}]" for i, im in enumerate(images)]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"images given twice: {twice}")
    return classes, names, images, keys


def _write_prediction(rgb, pred, out: Path, stem: str, names: list, palette, alpha: float, ignore) -> dict:
    """One image's label PNG and overlay -> its ``areas.json`` entry (``ignore``: the model's void value, or
    None when every pixel gets a class)."""
    k = len(names)
    labels = _labels_array(pred)
    save_png(label_image(labels, k, ignore), out / f"{stem}.labels.png")
    save_png(overlay_with_legend(rgb, labels, names, ignore=ignore, alpha=alpha, palette=palette),
             out / f"{stem}.overlay.png")
    entry = {"size": [int(labels.shape[0]), int(labels.shape[1])], "areas": class_areas(labels, names, ignore),
             "labels": f"{stem}.labels.png", "overlay": f"{stem}.overlay.png"}
    if ignore is not None:
        void = int((labels == ignore).sum())
        entry["void"] = {"pixels": void, "fraction": void / labels.size}
    return entry
