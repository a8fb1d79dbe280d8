"""Everything a training run leaves in its output directory: model, adapters, metrics, card, plots; and, for
every job that writes a directory, the check at the start of a run that the directory is its own
(:func:`claim_output_dir`)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opentrans_hf.data.transforms import CLIP_MEAN, CLIP_STD
from opentrans_hf.methods.sparse_mask.mask import MASK_SUBFOLDER
from opentrans_hf.training.divergence import check_finite_weights, first_non_finite
from opentrans_hf.training.fsdp import base_state_dict
from opentrans_hf.training.tracking import TRACKER_PROJECT
from opentrans_hf.training.warmup import frozen_by_rule
from opentrans_hf.utils import logging
from opentrans_hf.utils.distributed import on_main_process
from opentrans_hf.utils.hub import redact_tokens, render_model_card
from opentrans_hf.utils.io import atomic_directory, atomic_write_text, atomic_write_with, json_safe
from opentrans_hf.utils.locking import LOCK_NAME
from opentrans_hf.utils.plotting import colormap, figure
from opentrans_hf.utils.version import __version__

logger = logging.get_logger(__name__)

TRAIN_OUTPUTS = ("model", "metrics.json", "history.json", "outputs.json", "plots", "step_*", ".step_*.partial",
                 TRACKER_PROJECT)
"""What a training run writes into its output directory: the model, its metrics, history and plots, the
step checkpoints (and the hidden folders of unfinished ones), the trackers' logs."""


class IncompleteOutputs(RuntimeError):
    """Training finished and the model is saved, but a later output (an adapter, the evaluation, the card,
    metrics, plots, the push) failed; the message says where the model is and what failed."""

    def __init__(self, model_dir: Path, what: str, error: BaseException):
        self.model_dir, self.what = Path(model_dir), what
        kind = "" if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: "  # ours read as sentences
        super().__init__(f"the trained model is saved at {model_dir}, but {what} failed: {kind}{error}")


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
    metrics = dict(metrics, args=redact_tokens(asdict(args)))  # --hub_token never written
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


# ----- one run per output directory -----------------------------------------------------------------

class OutputDirInUse(FileExistsError):
    """An output directory holds the outputs of an earlier run, and this run neither resumes it nor was
    given ``--overwrite_output_dir``."""


@dataclass(frozen=True)
class OutputLayout:
    """What a job writes at the top of its output directory: ``names`` are ``fnmatch`` patterns of file and
    folder names (``"step_*"``), or ``"*"`` for a job whose output is the whole directory (a checkpoint, a
    dataset). Anything else in the directory (a user's notes, another tool's files) is not the job's: it is
    neither counted as an earlier run's output nor ever removed."""

    job: str
    names: tuple[str, ...]

    def earlier_outputs(self, directory: str | Path) -> list[Path]:
        """The entries of ``directory`` an earlier run of the job wrote (its lock file and folders holding
        nothing but lock files, as a pipeline's locks leave them, do not count)."""
        d = Path(directory)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir()
                      if p.name != LOCK_NAME and any(fnmatch.fnmatchcase(p.name, n) for n in self.names)
                      and _holds_something(p))


TRAIN_LAYOUT = OutputLayout("train", TRAIN_OUTPUTS)


def _holds_something(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return True
    for _, _, files in os.walk(path):
        if any(f != LOCK_NAME for f in files):
            return True
    return False


def remove_outputs(paths) -> None:
    """Remove ``paths`` (files and folders) for good, keeping any lock file inside them (a run holding a
    subfolder's lock keeps it) and the folders that hold one."""
    for path in paths:
        path = Path(path)
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        for root, dirs, files in os.walk(path, topdown=False):
            for f in files:
                if f != LOCK_NAME:
                    os.unlink(os.path.join(root, f))
            for sub in dirs:
                full = os.path.join(root, sub)
                if os.path.islink(full):
                    os.unlink(full)
                else:
                    try:
                        os.rmdir(full)
                    except OSError:  # it keeps a lock file
                        pass
        try:
            path.rmdir()
        except OSError:
            pass


def _listing(paths: list[Path], limit: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir_free(directory: str | Path, layout: OutputLayout, *, overwrite: bool = False,
                          resuming: bool = False, resume_hint: str | None = None) -> list[Path]:
    """The earlier outputs of ``layout``'s job in ``directory`` (an empty list when there are none), or
    :class:`OutputDirInUse` when there are some and the run neither resumes them (``resuming``) nor
    replaces them (``overwrite``). ``resume_hint`` says how this job resumes a run, for the message.
    Nothing is removed: see :func:`claim_output_dir`."""
    earlier = layout.earlier_outputs(directory)
    if not earlier or overwrite or resuming:
        return earlier
    how = f"{resume_hint} to resume that run, " if resume_hint else ""
    raise OutputDirInUse(
        f"--output_dir {directory} holds the outputs of an earlier {layout.job} run ({_listing(earlier)}): one run "
        f"per output directory; pass {how}--overwrite_output_dir to remove them first, or choose another --output_dir")


def claim_output_dir(directory: str | Path, layout: OutputLayout, *, overwrite: bool = False,
                     resuming: bool = False, resume_hint: str | None = None, state=None) -> list[Path]:
    """Make ``directory`` this run's, before anything is loaded; the caller holds the directory's lock
    (:func:`~opentrans_hf.utils.locking.output_dir_lock`). Earlier outputs of the job are kept when
    ``resuming`` (the job's own resume checks their settings), removed with ``overwrite`` (only the
    entries of ``layout``: other files stay), and otherwise refused (:class:`OutputDirInUse`, naming them
    and the way out). ``state``: under Accelerate the main process checks and removes, and every process
    shares the outcome. Returns what was removed."""

    def claim():
        earlier = check_output_dir_free(directory, layout, overwrite=overwrite, resuming=resuming,
                                        resume_hint=resume_hint)
        if earlier and overwrite and not resuming:
            logger.warning(f"--overwrite_output_dir: removing the earlier {layout.job} run's outputs in {directory}: "
                           f"{_listing(earlier, limit=8)}")
            remove_outputs(earlier)
            return earlier
        return []

    return on_main_process(state, claim) or []
