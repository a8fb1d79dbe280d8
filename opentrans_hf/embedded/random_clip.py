"""Random-initialised CLIP checkpoints with a working tokenizer, built entirely offline.

No weights can be downloaded where this project is developed and tested, so tests, benchmarks and
the demo start from :func:`make_random_clip`: the shapes of the real checkpoints (``"vit-b16"``,
``"vit-l14"``) or a tiny one for tests, saved with ``save_pretrained`` so that every later step goes
through the same ``from_pretrained`` code path as a Hub id would.

The tokenizer is CLIP's byte-level BPE (lower-cased words, ``</w>`` end-of-word marker) with a small
vocabulary learned here from a built-in corpus of segmentation class names and prompt templates.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

CLIP_SIZES: dict[str, dict] = {
    # tiny: the tests' model (the smallest vision tower that still has every layer type)
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    image_size=30, patch_size=2),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77),
        projection_dim=16,
    ),
    # small: a few MB, for CPU demos that must train in minutes
    "small": dict(
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    image_size=64, patch_size=8),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=77),
        projection_dim=128,
    ),
    # shapes of openai/clip-vit-base-patch16
    "vit-b16": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  max_position_embeddings=77, vocab_size=49408),
        projection_dim=512,
    ),
    # shapes of openai/clip-vit-large-patch14
    "vit-l14": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408),
        projection_dim=768,
    ),
}

# The corpus the small BPE vocabulary is learned from: prompt templates and common class names of
# ADE20K / Pascal Context / COCO-Stuff / Cityscapes, so that prompts tokenise into few sub-words.
_CORPUS = """
a photo of a {}. a photo of the {}. a photo of many {}. a photo of the small {}. a photo of the large {}.
a bad photo of a {}. a cropped photo of the {}. a bright photo of a {}. a dark photo of the {}.
a close-up photo of a {}. a rendering of a {}. there is a {} in the scene. this is a picture of a {}.
background void unlabeled other thing stuff
wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door table
mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat fence
desk rock wardrobe lamp bathtub railing cushion base box column signboard chest counter sand sink
skyscraper fireplace refrigerator grandstand path stairs runway case pool pillow screen stairway river
bridge bookcase blind coffee toilet flower book hill bench countertop stove palm kitchen computer swivel
boat bar arcade hovel bus towel light truck tower chandelier awning streetlight booth television airplane
dirt apparel pole land bannister escalator ottoman bottle buffet poster stage van ship fountain conveyer
canopy washer plaything swimming stool barrel basket waterfall tent bag minibike cradle oven ball food
step tank trade name microwave pot animal bicycle lake dishwasher blanket sculpture hood sconce vase
traffic tray ashcan fan pier crt plate monitor bulletin shower radiator glass clock flag
aeroplane bird bottle cat cow dining dog horse motorbike potted sheep train tvmonitor
rider motorcycle terrain vegetation pole traffic sign sidewalk
circle square triangle stripes dots checkerboard red green blue yellow orange purple white black
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-style BPE merges from ``corpus``; return (vocab, merges)."""
    byte_enc = _bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower().replace("{}", " ")))
    seqs = {}
    for w, c in words.items():
        chars = [byte_enc[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        seqs[tuple(chars)] = seqs.get(tuple(chars), 0) + c
    base = list(byte_enc.values())
    vocab_list = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for seq, c in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        vocab_list.append(a + b)
        new = {}
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        seqs = new
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(num_merges: int = 400) -> CLIPTokenizer:
    """A CLIP tokenizer with a small BPE vocabulary learned offline from the built-in corpus."""
    vocab, merges = _learn_bpe(_CORPUS, num_merges)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def random_clip_config(size: str, vocab_size: int | None = None, tokenizer: CLIPTokenizer | None = None) -> CLIPConfig:
    """The ``CLIPConfig`` of a named size (see ``CLIP_SIZES``)."""
    if size not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {size!r}; choose one of {sorted(CLIP_SIZES)}")
    spec = CLIP_SIZES[size]
    text = dict(spec["text"])
    if tokenizer is not None:
        text.setdefault("vocab_size", len(tokenizer))
        text.update(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    elif vocab_size is not None:
        text["vocab_size"] = vocab_size
    return CLIPConfig(
        text_config=CLIPTextConfig(**text).to_dict(),
        vision_config=CLIPVisionConfig(**spec["vision"]).to_dict(),
        projection_dim=spec["projection_dim"],
    )


def make_random_clip(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-initialised ``CLIPModel`` checkpoint and its tokenizer to ``path``.

    Load it back with ``CLIPModel.from_pretrained(path)`` (or ``CLIPVisionModel``) and
    ``AutoTokenizer.from_pretrained(path)``. ``size``: one of ``CLIP_SIZES`` -- ``"tiny"``
    (tests), ``"small"`` (CPU demos), ``"vit-b16"`` and ``"vit-l14"`` (the real checkpoints' shapes).
    The same ``seed`` gives the same weights.
    """
    tok = build_clip_tokenizer()
    config = random_clip_config(size, tokenizer=tok)
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_random_clip_vision(size: str, seed: int = 0):
    """An in-memory random-initialised ``CLIPVisionModel`` of a named size (no disk round trip)."""
    config = random_clip_config(size).vision_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModel(config)
