"""Evaluation of an OVS model on a segmentation split, exact under several processes.

Units: the result dicts hold fractions of 1 under the Hub ``mean_iou`` metric's keys (``mean_iou``,
``overall_accuracy``, ``per_category_iou``, ...; also ``mean_iou_seen`` / ``mean_iou_unseen``), as
``metrics.json`` and ``evaluate --out`` store them; everything people read (:func:`results_table`,
logs, model cards) shows percent with two decimals (:func:`percent`)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .metrics import SegmentationMetric, metrics_from_confusion

# recorded beside the numbers in metrics.json and `evaluate --out`
METRIC_UNITS = "mean_iou, overall_accuracy, per_category_iou, ...: fractions of 1 (tables, logs and cards show percent)"


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Examples ``rank, rank + world, ...``: every example on exactly one process (no padding)."""
    return list(range(rank, n, world))


@torch.no_grad()
def evaluate_segmentation(model, split, class_names: list[str], *, batch_size: int = 8, accelerator=None,
                          ignore_index: int = 255, desc: str = "eval", max_examples: int | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU (fractions of 1) of ``model.predict`` on ``split`` (a
    SegmentationSplit).

    Each process predicts its own shard of the examples; the confusion matrices are summed across
    processes, so every process returns the same numbers, equal to a single-process run. Examples
    without a single labelled pixel are an error (there is nothing to score), not a NaN mIoU.
    """
    from ..data.transforms import collate_segmentation

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    n = len(split) if max_examples is None else min(len(split), max_examples)
    idx = shard_indices(n, rank, world)
    metric = SegmentationMetric(len(class_names), ignore_index=ignore_index, class_names=class_names)
    was_training = model.training
    model.eval()
    show = accelerator is None or accelerator.is_main_process
    for start in tqdm(range(0, len(idx), batch_size), desc=desc, disable=not show, leave=False):
        batch = collate_segmentation([split[i] for i in idx[start : start + batch_size]])
        preds = model.predict(batch["pixel_values"].to(device), class_names, allow_void=False)
        preds = torch.stack([p.to(device) for p in preds]) if isinstance(preds, (list, tuple)) else preds
        metric.update(preds, batch["labels"].to(device))
    model.train(was_training)
    confusion = metric.reduced_confusion(accelerator)
    if int(confusion.sum()) == 0:
        raise ValueError(f"{getattr(split, 'name', desc)}: none of the {n} evaluated examples has a labelled pixel "
                         f"(every label is the ignore index {ignore_index}): nothing to score")
    return metrics_from_confusion(confusion, class_names)


def evaluate_splits(model, splits: dict, *, seen_classes: list[str] | None = None, batch_size: int = 8,
                    accelerator=None, max_examples: int | None = None) -> dict:
    """``{name: metrics}`` for several splits (each with its own class names); with ``seen_classes``,
    also ``mean_iou_seen`` / ``mean_iou_unseen`` over the classes in / not in it (zero-shot); and, for
    people and model cards, ``vocabulary`` (where the split's class names came from, its label
    conventions), ``dataset`` and ``split``."""
    import math

    seen_set = set(seen_classes or [])
    results = {}
    for name, split in splits.items():
        res = evaluate_segmentation(model, split, split.class_names, batch_size=batch_size, accelerator=accelerator,
                                    max_examples=max_examples, desc=f"eval {name}")
        if seen_set:
            for key, keep in (("mean_iou_seen", True), ("mean_iou_unseen", False)):
                vals = [iou for c, iou in zip(split.class_names, res["per_category_iou"])
                        if (c in seen_set) == keep and not math.isnan(iou)]
                if any((c in seen_set) == keep for c in split.class_names):
                    res[key] = sum(vals) / len(vals) if vals else float("nan")
        res["vocabulary"] = getattr(split, "vocabulary", None)
        if getattr(split, "origin", None):
            res["dataset"], res["split"] = split.origin
        results[name] = res
    return results


def percent(value) -> str:
    """A fraction of 1 as percent with two decimals (``0.5395 -> "53.95"``); ``"-"`` for None."""
    return "-" if value is None else f"{100 * float(value):.2f}"


def results_table(results: dict) -> str:
    """A markdown table, one row per evaluated dataset: where its class names came from, how many, and
    mIoU, pixel accuracy and seen / unseen mIoU in percent."""
    lines = ["| dataset | vocabulary | classes | mIoU (%) | pixel acc (%) | mIoU seen (%) | mIoU unseen (%) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('vocabulary') or '-'} | {len(r['per_category_iou'])} | {percent(r['mean_iou'])} | "
                     f"{percent(r['overall_accuracy'])} | {percent(r.get('mean_iou_seen'))} | "
                     f"{percent(r.get('mean_iou_unseen'))} |")
    return "\n".join(lines)
