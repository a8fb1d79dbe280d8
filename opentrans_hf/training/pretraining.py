"""Image-text pretraining of a small CLIP on the embedded captions: a CLIP that knows the classes.

No CLIP weights can be downloaded where this project is developed, and a random CLIP knows no class
names, so zero-shot results on the embedded dataset would be at chance. :func:`pretrain_clip` trains
a small ``CLIPModel`` the way CLIP was trained -- on images and captions only -- on the embedded
dataset's captioned images ("a photo of grass, sand and snow."), where every class name, the held-out
ones included, appears in captions, while no segmentation label is ever used. Three losses, all from
the captions alone:

* ``contrastive``: CLIP's own image-text loss (``CLIPModel(..., return_loss=True)``);
* ``patch``: every patch shows one of the classes the caption names (multiple-instance learning: the
  patch's class probability mass on the named classes, over the class prompts of the OVS classifier);
* ``presence``: each named class is the most likely class of at least one patch (max over patches).

The patch-level terms make the patch tokens, through ``post_layernorm`` and ``visual_projection``,
classify against the text embeddings of class prompts: what dense open-vocabulary segmentation reads
from a CLIP. :func:`pretrained_clip` builds such a checkpoint once per (size, seed, data version) in a
cache directory and returns its path; every job accepts it as ``--model_name_or_path``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPModel, get_cosine_schedule_with_warmup

from opentrans_hf.data.assembly import load_split
from opentrans_hf.data.transforms import SegmentationTransform, collate_segmentation
from opentrans_hf.embedded.dataset import CLASS_NAMES, DATA_VERSION, HELD_OUT_CLASSES, caption, render_example
from opentrans_hf.embedded.random_clip import build_clip_tokenizer, random_clip_config
from opentrans_hf.models.classifier import OpenVocabClassifier
from opentrans_hf.models.configuration_ovs import DEFAULT_TEMPLATES
from opentrans_hf.models.zeroshot import CLIPDenseZeroShot, dense_class_logits
from opentrans_hf.training.evaluation import evaluate_splits, shard_indices
from opentrans_hf.utils import logging
from opentrans_hf.utils.distributed import on_main_process
from opentrans_hf.utils.io import atomic_directory, json_safe
from opentrans_hf.utils.modules import eval_mode

logger = logging.get_logger(__name__)

PRETRAINING_DEFAULTS: dict[str, dict] = {
    # size -> training length and batch (the default size trains in a few minutes on 2 CPU cores)
    "tiny": dict(max_steps=40, batch_size=16, num_examples=256, learning_rate=2e-3),
    "small": dict(max_steps=300, batch_size=48, num_examples=4000, learning_rate=1e-3),
}
LOSS_WEIGHTS = {"contrastive": 1.0, "patch": 1.0, "presence": 1.0}
_PRETRAIN_SEED_OFFSET = 50_000  # pretraining images never coincide with the segmentation train/eval examples


def default_cache_dir() -> Path:
    """``$OPENTRANS_HF_CACHE`` or ``~/.cache/opentrans_hf``."""
    return Path(os.environ.get("OPENTRANS_HF_CACHE", Path.home() / ".cache" / "opentrans_hf"))


def cache_key(size: str, seed: int) -> str:
    return f"pretrained-clip-{size}-seed{seed}-data-v{DATA_VERSION}"


class CaptionedImages:
    """``num_examples`` embedded images (rendered once, seeded) with the classes in each; a fresh
    caption phrasing per draw."""

    def __init__(self, num_examples: int, image_size: int, seed: int):
        to_pixels = SegmentationTransform(image_size)  # the frameworks' evaluation preprocessing
        pixels, self.present = [], []
        for i in range(num_examples):
            img, lab = render_example(i, image_size, seed + _PRETRAIN_SEED_OFFSET)
            pixels.append(to_pixels(img)[0])
            self.present.append(sorted(int(c) for c in np.unique(lab)))
        self.pixels = torch.stack(pixels)

    def __len__(self) -> int:
        return len(self.present)

    def batch(self, idx, rng: np.random.Generator):
        present = torch.zeros(len(idx), len(CLASS_NAMES), dtype=torch.bool)
        texts = []
        for row, i in enumerate(idx):
            present[row, self.present[i]] = True
            texts.append(caption(self.present[i], rng))
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        pixels = self.pixels[idx].clone()
        pixels[flip] = pixels[flip].flip(-1)
        return pixels, texts, present


def caption_losses(out, patch_logits: torch.Tensor, present: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three pretraining losses of a batch; ``present`` (B, K) bool: the classes its captions name."""
    logp = patch_logits.log_softmax(-1)  # (B, N, K)
    named = present[:, None, :]
    patch = -torch.logsumexp(logp.masked_fill(~named, -torch.inf), -1).mean()
    best = logp.max(1).values  # (B, K): the best patch of each class
    presence = -(best * present).sum() / present.sum()
    return {"contrastive": out.loss, "patch": patch, "presence": presence}


@torch.no_grad()
def zero_shot_evaluation(clip, tokenizer, *, embedded_size: int = 384, seed: int = 0, batch_size: int = 32,
                         accelerator=None) -> dict:
    """Training-free zero-shot results of a CLIP on the embedded validation split (``embedded_size // 4``
    examples, the split the segmentation jobs evaluate on for that ``embedded_size``).

    Dense (:class:`~opentrans_hf.models.zeroshot.CLIPDenseZeroShot`): mIoU over all classes, the seen
    ones and the held-out ones (fractions of 1). Image level: a class is "present" when it is the most
    likely class of at least one patch; accuracy of these decisions over every (image, class) pair, and
    over the pairs of held-out classes. With ``accelerator`` (a collective: every process calls it) each
    process scores its share of the examples and every process returns the same numbers.
    """
    with eval_mode(clip):  # the CLIP is the caller's: its mode comes back afterwards
        model = CLIPDenseZeroShot(clip, tokenizer).eval()
        split = load_split("embedded", "validation", clip.config.vision_config.image_size, seed=seed,
                           embedded_size=embedded_size)
        seen = [c for c in CLASS_NAMES if c not in HELD_OUT_CLASSES]
        dense = evaluate_splits(model, {"embedded": split}, seen_classes=seen, batch_size=batch_size,
                                accelerator=accelerator)["embedded"]
        held = torch.tensor([c in HELD_OUT_CLASSES for c in CLASS_NAMES])
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        idx = shard_indices(len(split), rank, world)
        correct, n = torch.zeros(len(CLASS_NAMES)), torch.zeros(())
        for start in range(0, len(idx), batch_size):
            batch = collate_segmentation([split[i] for i in idx[start:start + batch_size]])
            logits = model.patch_logits(batch["pixel_values"].to(clip.logit_scale.device), CLASS_NAMES)
            predicted = F.one_hot(logits.argmax(1).flatten(1), len(CLASS_NAMES)).amax(1).bool().cpu()  # (B, K)
            labels = batch["labels"]
            ignore = split.transform.ignore_index
            truth = torch.stack([torch.bincount(y[y != ignore].flatten(), minlength=len(CLASS_NAMES)) > 0 for y in labels])
            correct += (predicted == truth).float().sum(0)
            n += len(labels)
        if accelerator is not None:
            correct, n = (accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu() for t in (correct, n))
    acc = correct / n
    return {
        "dense_mean_iou": dense["mean_iou"],
        "dense_mean_iou_seen": dense["mean_iou_seen"],
        "dense_mean_iou_unseen": dense["mean_iou_unseen"],
        "dense_per_category_iou": dict(zip(CLASS_NAMES, dense["per_category_iou"])),
        "presence_accuracy": float(acc.mean()),
        "presence_accuracy_unseen": float(acc[held].mean()),
        "examples": int(n),
    }


def pretrain_clip(output_dir: str | Path, size: str = "small", seed: int = 0, *, max_steps: int | None = None,
                  batch_size: int | None = None, learning_rate: float | None = None, num_examples: int | None = None,
                  accelerator=None, progress: bool = True) -> dict:
    """Pretrain a ``size`` CLIP (see ``random_clip.CLIP_SIZES``) on the embedded captions and write a
    normal CLIP checkpoint (config, safetensors weights, tokenizer, model card, ``pretraining.json``) to
    ``output_dir``. Deterministic for a seed on one process. Returns the pretraining record (settings,
    losses, zero-shot results).

    ``accelerator``: an Accelerate ``Accelerator`` to train data-parallel (each process draws its own
    batches); None: this process alone, on the CPU."""
    max_steps, batch_size, learning_rate, num_examples = _pretraining_recipe(
        size, max_steps, batch_size, learning_rate, num_examples)
    t0 = time.time()
    tok, config, clip, data, classifier, optimizer, scheduler = _pretraining_setup(
        size, seed, max_steps, learning_rate, num_examples, accelerator)
    model = accelerator.unwrap_model(clip) if accelerator is not None else clip
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    main = rank == 0
    rank_rng = np.random.default_rng([seed, rank])
    history = []
    bar = tqdm(range(max_steps), desc="pretrain-clip", disable=not (progress and main))
    for step in bar:
        idx = rank_rng.choice(len(data), size=batch_size, replace=False)
        pixels, texts, present = data.batch(idx, rank_rng)
        enc = tok(texts, padding=True, truncation=True, max_length=config.text_config.max_position_embeddings,
                  return_tensors="pt")
        pixels, present = pixels.to(device), present.to(device)
        out = clip(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                   pixel_values=pixels, return_loss=True)
        class_emb = classifier.class_embeddings(model, tok, CLASS_NAMES, trainable=True)
        patch_logits = dense_class_logits(model, out.vision_model_output.last_hidden_state[:, 1:, :], class_emb)
        losses = caption_losses(out, patch_logits, present)
        loss = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        _pretraining_step(accelerator, clip, model, optimizer, scheduler, step, loss, losses, device)
        if step % 50 == 0 or step == max_steps - 1:
            history.append({"step": step, **{k: round(v.item(), 4) for k, v in losses.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - t0
    record = {
        "size": size, "seed": seed, "data_version": DATA_VERSION, "max_steps": max_steps, "batch_size": batch_size,
        "processes": world, "learning_rate": learning_rate, "num_examples": num_examples,
        "loss_weights": LOSS_WEIGHTS, "class_names": CLASS_NAMES, "held_out_classes": HELD_OUT_CLASSES,
        "train_seconds": round(train_seconds, 1), "loss_history": history,
    }
    record["zero_shot"] = zero_shot_evaluation(model, tok, seed=seed, accelerator=accelerator)  # every process
    if main:
        _write_pretrained(output_dir, model, tok, record)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return record


def _pretraining_recipe(size: str, max_steps, batch_size, learning_rate, num_examples) -> tuple:
    """The size's recipe (``PRETRAINING_DEFAULTS``) under the values given -> ``(max_steps, batch_size,
    learning_rate, num_examples)``."""
    if size not in PRETRAINING_DEFAULTS:
        raise ValueError(f"no pretraining recipe for CLIP size {size!r}; choose one of {sorted(PRETRAINING_DEFAULTS)}")
    d = PRETRAINING_DEFAULTS[size]
    max_steps = d["max_steps"] if max_steps is None else max_steps
    batch_size = d["batch_size"] if batch_size is None else batch_size
    learning_rate = d["learning_rate"] if learning_rate is None else learning_rate
    num_examples = d["num_examples"] if num_examples is None else num_examples
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size {batch_size} must be between 1 and num_examples {num_examples} (each batch "
                         "draws distinct images)")
    return max_steps, batch_size, learning_rate, num_examples


def _pretraining_setup(size: str, seed: int, max_steps: int, learning_rate: float, num_examples: int, accelerator):
    """The tokenizer, a fresh CLIP (seeded), the captioned images, the class-text classifier and AdamW with a
    cosine schedule (prepared by ``accelerator`` when given) -> ``(tok, config, clip, data, classifier,
    optimizer, scheduler)``."""
    tok = build_clip_tokenizer()
    config = random_clip_config(size, tokenizer=tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(config)
    data = CaptionedImages(num_examples, config.vision_config.image_size, seed)
    classifier = OpenVocabClassifier(DEFAULT_TEMPLATES, config.projection_dim)
    decay = [p for n, p in clip.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, max_steps // 20), max_steps)
    if accelerator is not None:
        clip, optimizer, scheduler = accelerator.prepare(clip, optimizer, scheduler)
    return tok, config, clip, data, classifier, optimizer, scheduler


def _pretraining_step(accelerator, clip, model, optimizer, scheduler, step: int, loss, losses: dict, device) -> None:
    """The divergence check (every process stops at the same step), backward with the gradient clipped to 1,
    the optimizer step and CLIP's temperature clamp."""
    bad = not torch.isfinite(loss)
    if accelerator is not None and accelerator.num_processes > 1:  # every process stops at the same step
        bad = accelerator.reduce(torch.tensor(float(bad), device=device), reduction="sum").item() > 0
    if bad:
        raise FloatingPointError(f"pretraining diverged at step {step}: a non-finite loss (this process: "
                                 f"{ {k: round(v.item(), 4) for k, v in losses.items()} }); nothing was written")
    if accelerator is not None:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(clip.parameters(), 1.0)
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP clamps its temperature at 100
        model.logit_scale.clamp_(0, math.log(100))


def _write_pretrained(output_dir, model, tok, record: dict) -> None:
    """The checkpoint, atomically: weights, tokenizer, ``pretraining.json`` and the model card."""
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (Path(tmp) / "pretraining.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
        (Path(tmp) / "README.md").write_text(render_card(record))


def render_card(record: dict) -> str:
    zs = record["zero_shot"]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    return f"""---
library_name: transformers
tags: [clip, opentrans-hf, embedded]
---
# Embedded CLIP ({record['size']}, seed {record['seed']}, data v{record['data_version']})

A `CLIPModel` pretrained by `opentrans-hf pretrain-clip` on captioned images of the opentrans-hf embedded
dataset (contrastive image-text loss plus patch-level losses taken from the captions alone; no
segmentation labels), {record['max_steps']} steps of {record['batch_size']} images x {record['processes']} process(es),
{record['train_seconds']:.0f} s. Every class name appears in the captions; the held-out classes
({', '.join(record['held_out_classes'])}) are never in a segmentation label the frameworks train on.

## Zero-shot, training-free ({zs['examples']} embedded validation images)

| measure | all classes | held-out classes |
|---|---|---|
| dense mIoU (%) (patches vs class prompts) | {pct(zs['dense_mean_iou'])} | {pct(zs['dense_mean_iou_unseen'])} |
| image-level presence accuracy (%) | {pct(zs['presence_accuracy'])} | {pct(zs['presence_accuracy_unseen'])} |

Dense mIoU on the seen classes: {pct(zs['dense_mean_iou_seen'])}. Load it with
`CLIPModel.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`, or pass the path as
`--model_name_or_path` to any opentrans-hf job.
"""


def pretrained_clip(size: str = "small", seed: int = 0, cache_dir: str | Path | None = None, state=None,
                    progress: bool = True) -> Path:
    """The path of the pretrained embedded CLIP of ``size`` and ``seed``, built by :func:`pretrain_clip` on
    first use into ``cache_dir`` (default :func:`default_cache_dir`) under a name keyed by size, seed and
    the embedded data's version; later calls (any process, any job) reuse it.

    Concurrent builders wait for each other (a file lock beside the entry); a build interrupted at any
    point leaves no entry behind, so the next call builds it again. With ``state`` (an Accelerate
    ``PartialState``/``Accelerator``) the main process builds and the others wait.
    """
    import fcntl

    path = Path(cache_dir or default_cache_dir()) / cache_key(size, seed)

    def build() -> None:  # the main process alone, with no collective inside (the others wait for its outcome)
        if not _complete(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / f".{path.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
                if not _complete(path):
                    logger.info(f"building the pretrained embedded CLIP ({size}, seed {seed}) once into {path}")
                    pretrain_clip(path, size, seed, progress=progress)

    on_main_process(state, build)  # a build that fails stops every process, not just the main one
    if not _complete(path):
        raise RuntimeError(f"the pretrained embedded CLIP at {path} is incomplete (no config.json, "
                           "model.safetensors or pretraining.json): delete it and run again")
    return path


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "pretraining.json"))


def default_clip(model_name_or_path: str | None, state=None) -> str:
    """``model_name_or_path`` if given; else the jobs' default: the pretrained embedded ``"small"`` CLIP
    (:func:`pretrained_clip`, seed 0, built once and cached)."""
    if model_name_or_path:
        return str(model_name_or_path)
    return str(pretrained_clip("small", 0, state=state))
