"""Everything a training run leaves in its output directory: model, adapters, metrics, card, plots."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from opentrans_hf.data.transforms import CLIP_MEAN, CLIP_STD
from opentrans_hf.training.divergence import check_finite_weights, first_non_finite
from opentrans_hf.training.fsdp import base_state_dict
from opentrans_hf.training.warmup import frozen_by_rule
from opentrans_hf.utils import logging
from opentrans_hf.utils.hub import render_model_card
from opentrans_hf.utils.io import atomic_directory, atomic_write_text, atomic_write_with, json_safe
from opentrans_hf.utils.plotting import colormap, figure
from opentrans_hf.utils.version import __version__

logger = logging.get_logger(__name__)

MASK_SUBFOLDER = "mask_adapter"
"""Where a training run's model directory keeps the sparse mask it was trained with."""


class IncompleteOutputs(RuntimeError):
    """Training finished and the model is saved, but a later output (an adapter, the evaluation, the card,
    metrics, plots, the push) failed; the message says where the model is and what failed."""

    def __init__(self, model_dir: Path, what: str, error: BaseException):
        self.model_dir, self.what = Path(model_dir), what
        super().__init__(f"the trained model is saved at {model_dir}, but {what} failed: "
                         f"{type(error).__name__}: {error}")


def write_model(out: Path, model, mask, spectral, spectral_warmup_steps: int = 0,
                state_dict: dict | None = None) -> dict:
    """Write ``out/model`` atomically: the framework (+ tokenizer), and the adapters it was made with in
    subfolders (what a Hub repo of the run holds; the card is added by :func:`write_outputs`; the spectral
    adapter's own card says when alpha was measured: after ``spectral_warmup_steps``, if any). Refuses
    non-finite weights (``ValueError`` naming the parameter). An adapter that fails to save is left out
    and reported by :class:`IncompleteOutputs` once the model is in place. Returns ``{what: path}``.

    ``state_dict``: the weights to write instead of the module's own, e.g. the full state dict FSDP gathers
    (``accelerator.get_state_dict``; ``model``'s names, a spectral wrapper's ``base_model.`` prefix allowed):
    the directory is then the same complete model as without sharding."""
    plain = spectral.base_model if spectral is not None else model
    if state_dict is None:
        check_finite_weights(plain, "the trained model")
    else:
        state_dict = base_state_dict(state_dict, spectral)
        bad = first_non_finite(state_dict.items())
        if bad is not None:
            raise ValueError(f"the trained model has non-finite weights: parameter {bad[0]} holds {bad[1]} (a "
                             f"diverged training run?); refusing to use it")
    out.mkdir(parents=True, exist_ok=True)
    paths, failed = {"model": out / "model"}, []
    with atomic_directory(out / "model") as tmp:  # never a half-written model directory
        # a copy: transformers empties the state dict it is given as it writes it
        plain.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": dict(state_dict)}))
        for name, adapter in (("spectral_adapter", spectral), (MASK_SUBFOLDER, mask)):
            if adapter is None:
                continue
            kwargs = {"state_dict": state_dict} if adapter is spectral and state_dict is not None else {}
            if adapter is spectral and spectral_warmup_steps:
                kwargs["spectral_warmup_steps"] = spectral_warmup_steps
            try:
                adapter.save_pretrained(tmp / name, **kwargs)
            except Exception as err:  # noqa: BLE001 - the model itself is still saved, then this is reported
                shutil.rmtree(tmp / name, ignore_errors=True)
                failed.append((name, err))
            else:
                paths[name] = out / "model" / name
    if failed:
        name, err = failed[0]
        raise IncompleteOutputs(out / "model", f"saving its {name}", err) from err
    return paths


def write_outputs(out: Path, model, args, metrics: dict, history: dict, mask, spectral, eval_splits,
                  paths: dict, predictor=None) -> dict:
    """Write the rest of the run's artefacts under ``out`` once :func:`write_model` (whose result is
    ``paths``) has written the model directory: its card, metrics, history, plots; returns
    ``{what: path}`` (also printed by the CLI). ``predictor``: the model that predicts the plotted
    examples, if not ``model`` (under FSDP, which runs on every process, the plain copy it was evaluated with)."""
    paths = dict(paths)
    plain = predictor if predictor is not None else spectral.base_model if spectral is not None else model
    atomic_write_text(out / "model" / "README.md", render_training_card(args, metrics, spectral, mask))
    metrics = dict(metrics, args=asdict(args))
    atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    paths["metrics"] = out / "metrics.json"
    paths["history"] = atomic_write_text(out / "history.json", json.dumps(json_safe(history)) + "\n")
    plots = out / "plots"
    try:
        paths.update(write_plots(plots, history, plain, spectral, eval_splits))
    except ImportError as err:  # matplotlib is optional
        logger.warning(f"plots skipped: {err}")
    atomic_write_text(out / "outputs.json", json.dumps({k: str(v) for k, v in paths.items()}, indent=2) + "\n")
    return paths


def render_training_card(args, metrics: dict, spectral, mask) -> str:
    results = []
    for name, res in metrics["eval"].items():  # metrics hold fractions of 1; the card shows percent
        dataset, _, split = name.partition(":")
        dataset, split = res.get("dataset") or dataset, res.get("split") or split
        results.append({
            "task": {"type": "image-segmentation", "name": "Open-vocabulary semantic segmentation"},
            "dataset": {"name": name, "type": dataset, "split": split},
            "metrics": [{"type": "mean_iou", "value": round(100 * float(res["mean_iou"]), 2), "name": "mIoU (%)"},
                        {"type": "accuracy", "value": round(100 * float(res["overall_accuracy"]), 2),
                         "name": "pixel accuracy (%)"}],
        })
    model_id = args.hub_model_id or Path(args.output_dir).name
    card_data = {
        "library_name": "opentrans-hf",
        "tags": ["image-segmentation", "open-vocabulary", "opentrans", args.framework],
        "base_model": args.model_name_or_path or None,
        "model-index": [{"name": model_id, "results": results}],
    }
    return render_model_card(
        "segmentation_model.md", card_data, model_id=model_id, args=args, metrics=metrics,
        frozen=(len(spectral.frozen_layers) if spectral is not None else None), alpha_rows=_alpha_rows(spectral),
        freeze_rule=(spectral.spectral_config.freeze_rule if spectral is not None else None),
        trainable=(len(spectral.trainable_layers) if spectral is not None else None),
        sparsity=(round(100 * mask.sparsity, 2) if mask is not None else None), version=__version__,
    )


def _alpha_rows(spectral) -> list[dict]:
    """One row per analysed layer: its alpha and whether it was frozen (the card's table)."""
    if spectral is None:
        return []
    frozen = set(frozen_by_rule(spectral.spectral_config))
    return [{"layer": name, "alpha": alpha, "frozen": name in frozen}
            for name, alpha in spectral.spectral_config.layer_alphas.items()]


def write_plots(plots: Path, history: dict, model, spectral, eval_splits) -> dict:
    fig = figure(figsize=(11, 4))  # an ImportError without matplotlib, before anything is written
    plots.mkdir(parents=True, exist_ok=True)
    paths = {}
    axes = fig.subplots(1, 2)
    axes[0].plot(history["step"], history["loss"], color="tab:blue")
    axes[0].set(xlabel="step", ylabel="training loss", title="Loss")
    for key in sorted({k for e in history["eval"] for k in e} - {"step"}):
        pts = [(e["step"], e[key]) for e in history["eval"] if key in e and e[key] is not None]
        axes[1].plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=key)
    axes[1].set(xlabel="step", ylabel="mIoU (%)", title="Evaluation mIoU")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths["curves_plot"] = atomic_write_with(plots / "curves.png", lambda p: fig.savefig(p, format="png", dpi=100))
    if spectral is not None:
        paths["alpha_plot"] = spectral.spectral_report.plot(plots / "alpha.png", frozen=_frozen_report_names(spectral))
    name, split = next(iter(eval_splits.items()))
    paths["predictions_plot"] = plot_predictions(plots / "predictions.png", model, split)
    return paths


def _frozen_report_names(spectral) -> list[str]:
    frozen = set(spectral.frozen_layers)
    return [l.name for l in spectral.spectral_report.layers
            if l.name in frozen or l.name.rsplit("_", 1)[0] in frozen]


@torch.no_grad()
def plot_predictions(path: Path, model, split, n: int = 4):
    n = min(n, len(split))
    examples = [split[i] for i in range(n)]
    x = torch.stack([e[0] for e in examples])
    device = next(model.parameters()).device
    preds = model.predict(x.to(device), split.class_names)
    k = len(split.class_names)
    cmap = colormap("tab20", max(k, 2))
    fig = figure(figsize=(3 * n, 9))
    axes = fig.subplots(3, n, squeeze=False)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for j, (img, lab) in enumerate(examples):
        axes[0, j].imshow((img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        for row, m in ((1, lab), (2, preds[j].cpu())):
            shown = m.float().clone()
            shown[m == 255] = float("nan")
            axes[row, j].imshow(shown.numpy(), cmap=cmap, vmin=0, vmax=max(k - 1, 1), interpolation="nearest")
        for row, title in enumerate(("image", "ground truth", "prediction")):
            axes[row, j].set_title(title, fontsize=8)
            axes[row, j].axis("off")
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(k)]
    fig.legend(handles, split.class_names, loc="lower center", ncol=min(k, 8), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return atomic_write_with(path, lambda t: fig.savefig(t, format="png", dpi=90))
