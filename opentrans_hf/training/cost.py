"""What evaluating a model costs: parameters (dense, and effective: the nonzero weights when a sparse mask
was applied), FLOPs per image at the evaluation resolution, and measured throughput.

* Parameters: every parameter of the model (CLIP image and text towers, heads, classifier). Effective:
  the dense count less the weights of the CLIP image encoder's Linear/Conv layers that the sparse mask
  removes (a trained model's saved weights carry the mask's zeros), counted by
  :func:`opentrans_hf.methods.sparse_mask.counting.count_params_and_flops` with the model's ``mask_adapter/``
  when it has one (as ``reproduce`` counts its effective params).
* FLOPs per image (2 x multiply-accumulates): one forward of batch 1 under
  :func:`opentrans_hf.utils.flops.flop_counter`, the class text embeddings computed (and cached, as in
  evaluation) before counting, so only the per-image work counts. Square protocol: one forward at the
  ``S x S`` evaluation size. Sliding protocol: FLOPs of one window x the average number of windows per
  image over the evaluated images.
* Throughput: images per second over the evaluation loop (reading, transforms, prediction, scoring) of
  the main process's own shard of the examples, with the batch size (images per forward; windows per
  forward in the sliding protocol) and the device stated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opentrans_hf.methods.base import CONFIG_NAME
from opentrans_hf.methods.sparse_mask import SparseMask
from opentrans_hf.methods.sparse_mask.counting import count_params_and_flops
from opentrans_hf.training.evaluation import model_class_names, protocol_description, sliding_protocol
from opentrans_hf.training.outputs import MASK_SUBFOLDER
from opentrans_hf.utils.flops import flop_counter
from opentrans_hf.utils.modules import eval_mode


def load_model_mask(model_name_or_path):
    """``(SparseMask, path)`` of the ``mask_adapter/`` a local model directory holds, else ``(None, None)``."""
    path = Path(str(model_name_or_path)) / MASK_SUBFOLDER
    if not (path / CONFIG_NAME).is_file():
        return None, None
    return SparseMask.from_pretrained(path), str(path)


def parameter_counts(model, mask=None) -> dict:
    """``{"params": dense count of every parameter, "params_effective": less the weights the mask (or
    exact zeros in the CLIP image encoder's Linear/Conv layers) removes}``."""
    total = sum(p.numel() for p in model.parameters())
    tower = count_params_and_flops(model, mask)
    return {"params": total, "params_effective": total - (tower["params"] - tower["effective_params"])}


@torch.no_grad()
def forward_flops(model, class_names: list, height: int, width: int) -> int:
    """FLOPs of one forward of one ``height x width`` image scored against ``class_names`` (text
    embeddings computed, and cached, before counting)."""
    device = next(model.parameters()).device
    dtype = next(model.clip.vision_model.parameters()).dtype
    x = torch.zeros(1, 3, height, width, device=device, dtype=dtype)
    with eval_mode(model):
        model(pixel_values=x, class_names=class_names)
        with flop_counter() as counter:
            model(pixel_values=x, class_names=class_names)
    return int(counter.get_total_flops())


def describe_device(device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def evaluation_cost(model, splits: dict, timing: dict, *, batch_size: int, device, mask=None,
                    mask_path: str | None = None) -> dict:
    """Parameters, FLOPs per image and throughput of evaluating ``model`` on ``splits`` (``timing``: what
    :func:`~opentrans_hf.training.evaluation.evaluate_splits` filled in). Flat keys cover all datasets
    (FLOPs per image weighted by their evaluated images, images/s = images / seconds of the main process's
    shard); ``datasets`` has them per dataset."""
    per = {}
    for name, split in splits.items():
        t = timing.get(name, {})
        names = model_class_names(split)
        if sliding_protocol(split):
            window = t["window"]
            per_window = forward_flops(model, names, window, window)
            entry = {"flops_per_image": per_window * t["windows_per_image"], "flops_per_window": per_window,
                     "windows_per_image": t["windows_per_image"], "window": window, "stride": t["stride"]}
        else:
            size = split.transform.size
            entry = {"flops_per_image": forward_flops(model, names, size, size)}
        images, seconds = t.get("images", 0), t.get("seconds", 0.0)
        entry.update(resolution=protocol_description(split, t.get("window"), t.get("stride")),
                     images_per_second=images / seconds if images and seconds > 0 else None,
                     images_timed=images, seconds=seconds, images_evaluated=t.get("images_total", images))
        per[name] = entry
    weight = sum(e["images_evaluated"] for e in per.values())
    images = sum(e["images_timed"] for e in per.values())
    seconds = sum(e["seconds"] for e in per.values())
    resolutions = {e["resolution"] for e in per.values()}
    processes = max((t.get("processes", 1) for t in timing.values()), default=1)
    return {
        **parameter_counts(model, mask),
        "sparse_mask": mask_path,
        "flops_per_image": (sum(e["flops_per_image"] * e["images_evaluated"] for e in per.values()) / weight
                            if weight else None),
        "images_per_second": images / seconds if images and seconds > 0 else None,
        "batch_size": batch_size,
        "device": describe_device(device),
        "processes": processes,
        "resolution": resolutions.pop() if len(resolutions) == 1 else "per dataset",
        "notes": ("FLOPs = 2 x multiply-accumulates of one image (sliding: one window x windows per image), class "
                  "text embeddings cached; images/s: the main process's own shard, whole evaluation loop; "
                  "batch size: images per forward (sliding: windows per forward) per process"),
        "datasets": per,
    }


def si(value) -> str:
    """``1234567 -> "1.23M"``; ``"-"`` for None."""
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def cost_table(cost: dict) -> str:
    """The "model cost" markdown: a line with the parameters, batch size and device, then one row per
    dataset with its resolution, FLOPs per image and images/s."""
    procs = cost["processes"]
    mask = f", sparse mask {cost['sparse_mask']}" if cost.get("sparse_mask") else ""
    lines = [f"model cost: {si(cost['params'])} params ({si(cost['params_effective'])} effective{mask}); batch size "
             f"{cost['batch_size']} per process (sliding: windows per forward), device {cost['device']}, {procs} "
             f"process{'es' if procs != 1 else ''}; images/s of the main process's shard over the whole evaluation loop",
             "",
             "| dataset | resolution | FLOPs / image | images / s |",
             "|---|---|---|---|"]
    for name, e in cost["datasets"].items():
        flops = si(e["flops_per_image"])
        if "flops_per_window" in e:
            flops += f" ({si(e['flops_per_window'])} x {e['windows_per_image']:.2f} windows)"
        ips = "-" if e["images_per_second"] is None else f"{e['images_per_second']:.2f}"
        lines.append(f"| {name} | {e['resolution']} | {flops} | {ips} |")
    return "\n".join(lines)
