"""Evaluation of an OVS model on a segmentation split, exact under several processes.

Units: the result dicts hold fractions of 1 under the Hub ``mean_iou`` metric's keys (``mean_iou``,
``overall_accuracy``, ``per_category_iou``, ...; also ``mean_iou_seen`` / ``mean_iou_unseen``), as
``metrics.json`` and ``evaluate --out`` store them; everything people read (:func:`results_table`,
logs, model cards) shows percent with two decimals (:func:`percent`)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from opentrans_hf.data.benchmarks.registry import get_benchmark
from opentrans_hf.data.transforms import collate_segmentation
from opentrans_hf.models.classifier import class_synonyms
from opentrans_hf.models.modeling_ovs import default_sliding_stride, sliding_windows
from opentrans_hf.training.metrics import SegmentationMetric, metrics_from_confusion
from opentrans_hf.utils.modules import eval_mode

# recorded beside the numbers in metrics.json and `evaluate --out`
METRIC_UNITS = "mean_iou, overall_accuracy, per_category_iou, ...: fractions of 1 (tables, logs and cards show percent)"


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Examples ``rank, rank + world, ...``: every example on exactly one process (no padding)."""
    return list(range(rank, n, world))


def sliding_protocol(split) -> bool:
    """Whether ``split`` is evaluated the field's way (its transform resizes to a shortest side, the label
    keeps its size): then :func:`evaluate_segmentation` predicts by sliding windows, one image at a time."""
    return getattr(getattr(split, "transform", None), "resize", "square") == "shortest_side"


def model_class_names(split, class_names: list[str] | None = None) -> list:
    """What the model is given for ``split``'s classes: its ``class_prompts`` (names or tuples of synonyms,
    one per class) when it has them, else ``class_names`` (default the split's)."""
    names = list(class_names if class_names is not None else split.class_names)
    prompts = getattr(split, "class_prompts", None)
    return list(prompts) if prompts and len(prompts) == len(names) else names


def protocol_description(split, window: int | None = None, stride: int | None = None) -> str:
    """``"30x30 (square resize)"`` or ``"shortest side 800 (max 1333), sliding 224x224 windows, stride
    149"``: how ``split`` is evaluated, for tables and ``--out``."""
    tf = getattr(split, "transform", None)
    if tf is None:
        return "-"
    if not sliding_protocol(split):
        return f"{tf.size}x{tf.size} (square resize)"
    cap = f" (max {tf.max_size})" if tf.max_size else ""
    text = f"shortest side {tf.size}{cap}, sliding"
    if window:
        text += f" {window}x{window} windows, stride {stride or default_sliding_stride(window)}"
    return text


def resolve_eval_resize(benchmark=None, resize: str | None = None, shortest_side: int | None = None,
                        max_size: int | None = None) -> tuple[str, int | None, int | None]:
    """``(resize, shortest side, max size)`` for one evaluation dataset. ``resize`` None: ``"shortest_side"``
    when the dataset is a ``benchmark`` (a name from :mod:`opentrans_hf.data.benchmarks` or a ``Benchmark``)
    or when ``shortest_side`` / ``max_size`` are given, else ``"square"``. The shortest side and max size
    default to the benchmark's (Cityscapes 1024 / 2560), else FC-CLIP's / detectron2's test default 800 /
    1333. ``"square"`` gives ``("square", None, None)``."""
    if isinstance(benchmark, str):
        benchmark = get_benchmark(benchmark)
    if resize is None:
        resize = "shortest_side" if benchmark is not None or shortest_side or max_size else "square"
    if resize == "square":
        return "square", None, None
    if resize != "shortest_side":
        raise ValueError(f"eval resize must be 'square' or 'shortest_side', got {resize!r}")
    side = shortest_side or getattr(benchmark, "shortest_side", None) or 800
    cap = max_size or getattr(benchmark, "max_size", None) or 1333
    if cap < side:
        raise ValueError(f"the longer side's cap {cap} is smaller than the shortest side {side}: give a max size (--max_size) "
                         "of at least the shortest side")
    return "shortest_side", int(side), int(cap)


@torch.no_grad()
def evaluate_segmentation(model, split, class_names: list[str], *, batch_size: int = 8, accelerator=None,
                          ignore_index: int = 255, desc: str = "eval", max_examples: int | None = None,
                          window: int | None = None, stride: int | None = None, timing: dict | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU (fractions of 1) of ``model.predict`` on ``split`` (a
    SegmentationSplit); ``class_names`` name the label values (the metric's classes), the model is given
    the split's ``class_prompts`` (synonyms) when it has them (:func:`model_class_names`).

    A split in the field's protocol (:func:`sliding_protocol`: ``split.use_eval_resize("shortest_side")``)
    is predicted one image at a time by ``model.predict_sliding`` (windows of ``window``, default the
    model's ``config.image_size``, every ``stride`` pixels, ``batch_size`` windows per forward), and the
    prediction is nearest-resized to the label map's original size and scored there.

    Each process predicts its own shard of the examples; the confusion matrices are summed across
    processes, so every process returns the same numbers, equal to a single-process run. Examples
    without a single labelled pixel are an error (there is nothing to score), not a NaN mIoU.

    ``timing`` (a dict, filled in): ``images`` / ``seconds`` of this process's own shard (the whole loop:
    reading, transforms, prediction, scoring), ``processes``, ``images_total`` (all processes); and, in the sliding protocol,
    ``windows_per_image`` averaged over every process's images, ``window``, ``stride``.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    n = len(split) if max_examples is None else min(len(split), max_examples)
    idx = shard_indices(n, rank, world)
    metric = SegmentationMetric(len(class_names), ignore_index=ignore_index, class_names=class_names)
    names = model_class_names(split, class_names)
    sliding = sliding_protocol(split)
    if sliding:
        if not hasattr(model, "predict_sliding"):
            raise ValueError(f"{getattr(split, 'name', desc)} is evaluated by sliding windows, which "
                             f"{type(model).__name__} has no predict_sliding for; evaluate it with the square resize")
        window = int(window or model.config.image_size)
        stride = int(stride or default_sliding_stride(window))
    show = accelerator is None or accelerator.is_main_process
    with eval_mode(model):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with tqdm(total=len(idx), desc=desc, unit="img", disable=not show, leave=False) as bar:
            windows = _score_examples(model, split, idx, names, metric, device, batch_size, bar,
                                      (window, stride) if sliding else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    confusion = metric.reduced_confusion(accelerator)
    if int(confusion.sum()) == 0:
        raise ValueError(f"{getattr(split, 'name', desc)}: none of the {n} evaluated examples has a labelled pixel "
                         f"(every label is the ignore index {ignore_index}): nothing to score")
    if timing is not None:
        _fill_timing(timing, accelerator, len(idx), seconds, world, n, (windows, window, stride) if sliding else None)
    return metrics_from_confusion(confusion, class_names)


def _score_examples(model, split, idx, names, metric, device, batch_size: int, bar, sliding) -> int:
    """Predict the examples ``idx`` of ``split`` and add them to ``metric``: by sliding windows (``sliding``
    = ``(window, stride)``, one image at a time, the prediction resized to the label's size) or in batches
    of the square resize (``sliding`` None). Returns the number of windows predicted."""
    windows = 0
    if sliding:
        window, stride = sliding
        for i in idx:
            x, y = split[i]
            windows += len(sliding_windows(*x.shape[-2:], window, stride))
            pred = model.predict_sliding(x, names, window=window, stride=stride, batch_size=batch_size)
            if tuple(pred.shape) != tuple(y.shape):
                pred = F.interpolate(pred[None, None].float(), size=tuple(y.shape), mode="nearest")[0, 0].long()
            metric.update(pred.to(device), y.to(device))
            bar.update(1)
    else:
        for start in range(0, len(idx), batch_size):
            batch = collate_segmentation([split[i] for i in idx[start : start + batch_size]])
            preds = model.predict(batch["pixel_values"].to(device), names, allow_void=False)
            preds = torch.stack([p.to(device) for p in preds]) if isinstance(preds, (list, tuple)) else preds
            metric.update(preds, batch["labels"].to(device))
            bar.update(len(batch["pixel_values"]))
    return windows


def _fill_timing(timing: dict, accelerator, images: int, seconds: float, world: int, n: int, sliding) -> None:
    """:func:`evaluate_segmentation`'s ``timing``; ``sliding`` = ``(windows, window, stride)`` of this
    process (the windows per image averaged over every process's images) or None."""
    timing.update(images=images, seconds=seconds, processes=world, images_total=n)
    if sliding:
        windows, window, stride = sliding
        counts = torch.tensor([windows, images], dtype=torch.long)
        if accelerator is not None and world > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        timing.update(windows_per_image=int(counts[0]) / max(int(counts[1]), 1), window=window, stride=stride)


def evaluate_splits(model, splits: dict, *, seen_classes: list[str] | None = None, batch_size: int = 8,
                    accelerator=None, max_examples: int | None = None, window: int | None = None,
                    stride: int | None = None, timing: dict | None = None) -> dict:
    """``{name: metrics}`` for several splits (each with its own class names); with ``seen_classes``,
    also ``mean_iou_seen`` / ``mean_iou_unseen`` over the classes in / not in it (zero-shot; a class with
    synonyms is seen when any of its names is in it); and, for
    people and model cards, ``vocabulary`` (where the split's class names came from, its label
    conventions), ``dataset`` and ``split``; ``protocol`` (:func:`protocol_description`) for splits in
    the sliding protocol (``window`` / ``stride``: see :func:`evaluate_segmentation`). ``timing``, when
    given, gets ``{name: evaluate_segmentation's timing}``."""
    seen_set = set(seen_classes or [])
    results = {}
    for name, split in splits.items():
        clock = {}
        res = evaluate_segmentation(model, split, split.class_names, batch_size=batch_size, accelerator=accelerator,
                                    max_examples=max_examples, desc=f"eval {name}", window=window, stride=stride,
                                    timing=clock)
        if timing is not None:
            timing[name] = clock
        if seen_set:
            # a class is seen when any of its names was a training class (FC-CLIP's category overlap)
            seen = [not seen_set.isdisjoint((c, *class_synonyms(p)))
                    for c, p in zip(split.class_names, model_class_names(split))]
            for key, keep in (("mean_iou_seen", True), ("mean_iou_unseen", False)):
                vals = [iou for s, iou in zip(seen, res["per_category_iou"]) if s == keep and not math.isnan(iou)]
                if keep in seen:
                    res[key] = sum(vals) / len(vals) if vals else float("nan")
        res["vocabulary"] = getattr(split, "vocabulary", None)
        if getattr(split, "origin", None):
            res["dataset"], res["split"] = split.origin
        if sliding_protocol(split):
            res["protocol"] = protocol_description(split, clock.get("window"), clock.get("stride"))
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
