"""Training checkpoints: written completely or not at all, found by their recorded step, and resumed only
under the arguments they were made with.

A checkpoint is Accelerate's ``save_state`` plus ``history.json`` and, last, ``checkpoint.json`` (its step
and the run's fingerprint), all written into a hidden ``.step_N.partial`` directory that is renamed to
``step_N`` once complete. A killed write leaves at most the hidden directory (removed by the next run);
``--resume_from_checkpoint latest`` only considers directories with a ``checkpoint.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

from accelerate.utils import load as accelerate_load

from opentrans_hf.utils import logging
from opentrans_hf.utils.distributed import on_every_process, on_main_process
from opentrans_hf.utils.fingerprint import differences, fingerprint
from opentrans_hf.utils.hub import check_safetensors_file
from opentrans_hf.utils.io import (
    WriteError,
    atomic_write_text,
    is_integer,
    is_number,
    read_json,
    replace_directory,
    write_failure,
)

logger = logging.get_logger(__name__)

CHECKPOINT_FILE = "checkpoint.json"
# in checkpoint.json of a run with --spectral_warmup_steps, once past the switch: the spectral config applied
# then (alphas measured after the warm-up, trainable layers), re-applied before the optimizer state is loaded
SPECTRAL_KEY = "spectral_config"
PARTIAL_SUFFIX = ".partial"

# train arguments that never change the trained weights; every other one is part of the fingerprint
# (an argument added later is compared by default: refusing a resume is safer than mixing two runs)
NOT_FINGERPRINTED = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "ignore_checkpoint_mismatch", "checkpointing_steps",
    "eval_steps",
    "eval_split", "eval_datasets", "max_eval_examples", "report_to", "push_to_hub", "hub_model_id",
    "hub_private_repo", "hub_revision", "hub_token",
})


class CheckpointMismatch(ValueError):
    """A checkpoint was made with other arguments than the run that would resume it."""


def run_fingerprint(args, num_processes: int = 1) -> dict:
    """The arguments of a ``train`` run that change its result, plus the number of processes (it changes
    the global batch and the data order)."""
    values = {k: v for k, v in asdict(args).items() if k not in NOT_FINGERPRINTED}
    if values.get("max_steps", 0) > 0:
        values["num_epochs"] = None  # ignored when max_steps is set
    if values.get("dataset") != "embedded":
        values.pop("embedded_size", None)
    values["num_processes"] = num_processes
    return fingerprint(values)


def partial_path(out: Path, step: int) -> Path:
    return Path(out) / f".step_{step}{PARTIAL_SUFFIX}"


def remove_partial_checkpoints(out: Path) -> list[Path]:
    """Remove the hidden directories of checkpoint writes that never finished (the caller holds the
    output directory's lock, so none of them is being written)."""
    removed = []
    for p in Path(out).glob(f".step_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def save_checkpoint(accelerator, out: Path, step: int, history: dict, run_fingerprint: dict,
                    spectral_config: dict | None = None) -> Path:
    """Save the full training state as ``out/step_{step}``, atomically (a collective: every process calls
    it). An existing ``step_{step}`` is replaced only once the new one is complete. ``spectral_config``
    (a spectral tuning config applied during the run, as a dict) is recorded under :data:`SPECTRAL_KEY`.

    A write that fails (disk full, no permission, a file in the way) removes the partial checkpoint and
    raises :class:`~opentrans_hf.utils.io.WriteError`: one line naming the checkpoint, the reason and the
    last complete checkpoint, which is kept."""
    out = Path(out)
    tmp, final = partial_path(out, step), out / f"step_{step}"

    def finish():
        atomic_write_text(tmp / "history.json", json.dumps(history))
        record = {"step": step, "fingerprint": run_fingerprint}
        if spectral_config is not None:
            record[SPECTRAL_KEY] = spectral_config
        atomic_write_text(tmp / CHECKPOINT_FILE, json.dumps(record, indent=2) + "\n")  # last: marks it complete
        replace_directory(tmp, final)

    try:
        on_main_process(accelerator, lambda: shutil.rmtree(tmp, ignore_errors=True))
        on_every_process(accelerator, lambda: accelerator.save_state(str(tmp)))  # one failing stops them all
        on_main_process(accelerator, finish)
    except Exception as err:
        found = write_failure(err, final, tmp)  # before the partial checkpoint goes: a short write is judged by the space left
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if found is None:
            raise
        reason, code = found
        raise WriteError(final, reason, f"removed the partial checkpoint; {kept_checkpoint(out)}", code,
                         what="checkpoint ") from err
    return final


def kept_checkpoint(out: Path) -> str:
    """What a failed write in ``out`` leaves to resume from, for its error message."""
    try:
        path, record, _ = find_checkpoint(out, "latest")
    except (FileNotFoundError, ValueError, OSError):
        return "no complete checkpoint is kept (none was written before)"
    return (f"kept: the last complete checkpoint {path} (step {record['step']}), which "
            "--resume_from_checkpoint latest resumes")


def read_checkpoint(path: Path) -> dict:
    """The record (``step``, ``fingerprint``) of the checkpoint directory ``path``; a clear error if it is
    no complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / CHECKPOINT_FILE).is_file():
        raise ValueError(f"{path} is not a complete opentrans-hf checkpoint: it has no {CHECKPOINT_FILE} "
                         f"(written last, when a checkpoint is complete)")
    record = read_json(path / CHECKPOINT_FILE, "checkpoint record")
    step = record.get("step") if isinstance(record, dict) else None
    if not is_integer(step) or step < 0:
        raise ValueError(f"{path / CHECKPOINT_FILE} is not a valid checkpoint record: expected an integer "
                         f"'step' >= 0, got {step!r}")
    return record


HISTORY_KEYS = ("step", "loss", "lr", "eval", "spectral_switch")


def read_history(path: Path, step: int) -> dict:
    """The training history a checkpoint at ``step`` recorded (``history.json``), checked before a resumed run
    appends to it: per optimizer step its number, loss and learning rate (increasing steps up to ``step``,
    finite numbers, as many of each), evaluation points ``{"step": N, "<split>": mIoU, ...}`` with mIoU in
    [0, 1] (or NaN/null: undefined) and the spectral switch record, if any. Errors name the file and the value."""
    path = Path(path)
    history = read_json(path, "training history")
    where = f"training history {path}"
    if not isinstance(history, dict):
        raise ValueError(f"{where}: expected a JSON object with {list(HISTORY_KEYS[:4])}, got {type(history).__name__}")
    unknown = sorted(set(history) - set(HISTORY_KEYS))
    missing = [k for k in ("step", "loss", "eval") if k not in history]
    if unknown or missing:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else [])))
    history.setdefault("lr", None)
    for key in ("step", "loss", "lr", "eval"):
        if history[key] is not None and not isinstance(history[key], list):
            raise ValueError(f"{where}: {key!r} must be a list, got {history[key]!r}"[:500])
    steps = history["step"]
    bad = next((s for s in steps if not (is_integer(s) and 1 <= s <= step)), None)
    if bad is not None or any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"{where}: 'step' must list increasing optimizer steps from 1 to the checkpoint's {step}"
                         + (f", got {bad!r}" if bad is not None else f", got {steps[:10]}"))
    if history["lr"] is None:
        history["lr"] = []  # written before the learning rate was recorded
    for key in ("loss", "lr"):
        values = history[key]
        if key == "lr" and not values:
            continue
        if len(values) != len(steps):
            raise ValueError(f"{where}: {len(values)} {key!r} value(s) for {len(steps)} steps")
        bad = next((v for v in values if not (is_number(v) and math.isfinite(v) and (key == "loss" or v >= 0))), None)
        if bad is not None:
            raise ValueError(f"{where}: {key!r} must hold finite numbers{' >= 0' if key == 'lr' else ''}, got {bad!r}")
    for point in history["eval"]:
        if not (isinstance(point, dict) and is_integer(point.get("step")) and 0 <= point["step"] <= step):
            raise ValueError(f"{where}: an 'eval' point must be {{\"step\": N <= {step}, \"<split>\": mIoU, ...}}, "
                             f"got {point!r}"[:500])
        bad = next((f"{k!r}: {v!r}" for k, v in point.items() if k != "step" and not (
            v is None or (is_number(v) and (math.isnan(v) or 0 <= v <= 1)))), None)
        if bad is not None:
            raise ValueError(f"{where}: the 'eval' point of step {point['step']} has {bad}; an mIoU is in [0, 1] "
                             "(NaN or null: undefined)")
    switch = history.get("spectral_switch")
    if switch is not None and not (isinstance(switch, dict) and is_integer(switch.get("step"))
                                   and 0 <= switch["step"] <= step):
        raise ValueError(f"{where}: 'spectral_switch' must be the switch's record {{\"step\": N <= {step}, ...}}, "
                         f"got {switch!r}"[:500])
    return history


def find_checkpoint(out: Path, spec: str) -> tuple[Path, dict, list[str]]:
    """The checkpoint ``spec`` names (a directory, or ``"latest"``: the complete checkpoint in ``out``
    with the highest recorded step) -> ``(path, record, ignored)``; ``ignored`` lists the directories of
    ``out`` that look like checkpoints but are not complete ones, and why."""
    if spec != "latest":
        path = Path(spec)
        return path, read_checkpoint(path), []
    out = Path(out)
    found, ignored = [], []
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        if not (d / CHECKPOINT_FILE).is_file():
            if d.name.startswith("step_"):
                ignored.append(f"{d.name} (no {CHECKPOINT_FILE}: not a complete checkpoint)")
            continue
        try:
            record = read_checkpoint(d)
        except ValueError as err:
            ignored.append(f"{d.name} ({err})")
            continue
        # by recorded step; on a tie the directory named after its step
        found.append(((record["step"], d.name == f"step_{record['step']}", d.name), d, record))
    if not found:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {out}"
                                + (f"; ignored: {', '.join(ignored)}" if ignored else ""))
    _, path, record = max(found, key=lambda f: f[0])
    return path, record, ignored


def check_fingerprint(path: Path, record: dict, current: dict, ignore: bool = False) -> list[str]:
    """Refuse (:class:`CheckpointMismatch`) to resume checkpoint ``path`` under arguments other than its own,
    listing the differences; with ``ignore`` only log them (a warning). Returns the differences."""
    saved = record.get("fingerprint")
    if not isinstance(saved, dict):
        diffs = ["the checkpoint records no arguments"]
    else:
        diffs = differences(saved, current)
    if diffs and not ignore:
        raise CheckpointMismatch(
            f"checkpoint {path} was made with other arguments: {'; '.join(diffs)}. Resume with the same "
            f"arguments, use another --output_dir, or pass --ignore_checkpoint_mismatch to resume anyway")
    if diffs:
        logger.warning(f"resuming {path} despite other arguments (--ignore_checkpoint_mismatch): {'; '.join(diffs)}")
    return diffs


CHECKPOINT_PICKLES = (".bin", ".pkl", ".pt", ".pth")  # Accelerate's optimizer/scheduler/sampler/RNG state files


def load_checkpoint_state(accelerator, path: Path) -> None:
    """``accelerator.load_state(path)``, its files guarded. Accelerate reads the optimizer, scheduler and RNG
    states (``*.bin``, ``random_states_*.pkl``) with torch's weights-only unpickler: no code in a file runs, and
    any object but tensors, numbers, strings, containers and numpy arrays is refused. A file it refuses or cannot
    read (truncated, corrupt) is named in one line (:func:`checkpoint_file_error`) instead of torch's text. The
    process's RNG state file is checked first: Accelerate would only log that it could not load it and resume
    with other random numbers."""
    rng = Path(path) / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():
        raise FileNotFoundError(f"checkpoint {path} lacks {rng.name} (process {accelerator.process_index}'s random "
                                "state): it is incomplete; resume from another checkpoint or start over")
    problem = _file_error(rng)
    if problem is None:
        try:
            accelerator.load_state(str(path))
            return
        except Exception as err:  # re-raised as it is unless a file of the checkpoint explains it
            problem = checkpoint_file_error(path)
            if problem is None:
                raise
            raise ValueError(problem) from err
    raise ValueError(problem)


def checkpoint_file_error(path: Path) -> str | None:
    """The first file of checkpoint directory ``path`` that cannot be loaded as Accelerate loads it (pickles
    with the weights-only unpickler and Accelerate's numpy allowances; safetensors by their header), as a line
    naming it; None when every file loads."""
    for f in sorted(Path(path).iterdir()):
        problem = _file_error(f) if f.is_file() else None
        if problem is not None:
            return problem
    return None


def _file_error(f: Path) -> str | None:
    if f.suffix == ".safetensors":
        try:
            check_safetensors_file(f, "checkpoint weights")
        except ValueError as err:
            return str(err)
        return None
    if f.suffix not in CHECKPOINT_PICKLES:
        return None
    try:  # zip-format torch.save files are memory-mapped: the check reads the pickles, not the tensor data
        accelerate_load(f, map_location="cpu", mmap=zipfile.is_zipfile(f))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it names {found.group(1)})" if found else ""
        return (f"refused: {f} is not a plain tensor/state pickle{what}; opentrans-hf loads checkpoints with torch's "
                "weights-only unpickler, which runs no code from the file and accepts only tensors, numbers, strings, "
                "containers and numpy arrays. A checkpoint opentrans-hf wrote holds nothing else, so this file was "
                "replaced or changed: resume from another checkpoint or start over")
    except Exception:  # noqa: BLE001 - torch's reason (zip reader internals) is in the --debug traceback
        return (f"cannot read checkpoint file {f}: it is not a complete torch.save file (truncated or corrupt); "
                "resume from another checkpoint or start over")
    return None
