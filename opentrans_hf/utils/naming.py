"""Names relative to the CLIP vision tower, so that one adapter fits every model holding that tower.

Adapters (sparse masks, spectral tuning configs) store layer and parameter names relative to the CLIP
vision tower (``encoder.layers.0.mlp.fc1``) and resolve them when applied: as they are
(``CLIPVisionModel`` in transformers 5, non-CLIP models, a framework's own heads), with the
``vision_model.`` prefix (``CLIPModel``, ``CLIPVisionModel`` before transformers 5), with
``clip.vision_model.`` (CLIPSeg, our OVS frameworks), or under any single ``*.vision_model.``.
Names outside the vision tower (a head, the text tower) stay relative to the model they were made on.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

VISION_PREFIXES = ("", "vision_model.", "clip.vision_model.")


def encoder_block_regex(layers: str = r"\d+") -> str:
    """A regex for the CLIP encoder blocks (``encoder.layers.<i>``) whose index matches the regex ``layers``."""
    return rf"encoder\.layers\.(?:{layers})"


def vision_encoder_targets(layers: str = r"\d+", stem: bool = True) -> str:
    """A PEFT ``target_modules`` regex: the Linear/Conv layers of the CLIP image encoder's blocks whose
    index matches the regex ``layers``.

    ``stem=True``: also the patch embedding, under a ``vision_model.`` module (a ``CLIPModel``, CLIPSeg or
    a framework). ``stem=False``: the blocks only, under a ``vision_model.`` module or in a bare vision
    tower (``encoder.layers.0.mlp.fc1``); the text tower's blocks never match."""
    blocks = rf"{encoder_block_regex(layers)}\..*"
    if stem:
        return rf"(?:.*\.)?vision_model\.(?:embeddings\.patch_embedding|{blocks})"
    return rf"(.*vision_model\.)?{blocks}"


CLIP_VISION_ENCODER_TARGETS = vision_encoder_targets()
"""Every Linear/Conv of the CLIP image encoder (:func:`vision_encoder_targets` of every block)."""


def canonical_name(name: str) -> str:
    """A name relative to the CLIP vision tower: everything up to the first ``vision_model.`` is
    dropped (``CLIPModel``: ``vision_model.``, CLIPSeg: ``clip.vision_model.``, our frameworks); other
    names (``CLIPVisionModel`` in transformers 5, non-CLIP models, text tower, heads) stay as they are."""
    head, sep, tail = name.partition("vision_model.")
    return tail if sep else name


def canonical_names(names: Iterable[str]) -> dict[str, str] | None:
    """``{name: canonical_name(name)}``, or None when two names would get the same canonical name
    (e.g. a model holding two vision towers: its names then stay relative to the model)."""
    out = {n: canonical_name(n) for n in names}
    return out if len(set(out.values())) == len(out) else None


def name_candidates(name: str, names: Collection[str]) -> list[str]:
    """The names of ``names`` that canonical ``name`` may stand for: ``[name]`` itself or with one of the
    :data:`VISION_PREFIXES` (the first found), else every name ending in ``vision_model.<name>``."""
    for prefix in VISION_PREFIXES:
        if prefix + name in names:
            return [prefix + name]
    suffix = "vision_model." + name
    return [n for n in names if n.endswith(suffix)]


def resolve_name(name: str, names: Collection[str], what: str = "name", owner: str = "the model") -> str | None:
    """The one name of ``names`` (a model's ``named_modules()`` or ``named_parameters()`` names) that
    canonical ``name`` stands for, None if none; several candidates are an error naming them."""
    hits = name_candidates(name, names)
    if len(hits) > 1:
        raise ValueError(f"{what} {name!r} matches several names of {owner}: {hits}")
    return hits[0] if hits else None


def vision_prefix_regex(name: str) -> str:
    """A full-match regex for a canonical name on any host (``re.escape`` + an optional ``*vision_model.``)."""
    return r"(?:.*vision_model\.)?" + re.escape(name)
