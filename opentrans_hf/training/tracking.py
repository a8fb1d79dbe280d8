"""What the train job sends to the trackers of ``--report_to`` (tensorboard, wandb, mlflow, ... through
``accelerator.init_trackers`` / ``accelerator.log``; accelerate logs on the main process only).

- the hyperparameters, once, as typed values: every flag of the job with the solver's resolved values in place
  of the unset solver flags (the framework's defaults the run used), plus the run's length and process count;
  ints, floats, bools and strings as they are, anything else (None, lists, dicts, paths) as a string;
- every optimizer step: ``train/loss``, ``lr``, ``train/steps_per_second`` and ``train/images_per_second``
  (the step's images over all processes, over the step's time without evaluation and checkpoints);
- every evaluation (``--eval_steps``) and the final one: ``eval/<dataset>/<metric>`` for ``mean_iou``,
  ``overall_accuracy`` (pixel accuracy), ``mean_accuracy``, ``mean_iou_seen`` and ``mean_iou_unseen``,
  fractions of 1 as in ``metrics.json``;
- the spectral switch, at its step: ``spectral/switch_step``, ``spectral/frozen_layers`` and
  ``spectral/trainable_layers`` (layer counts).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from opentrans_hf.training.optim import SOLVER_FLAGS
from opentrans_hf.utils import logging
from opentrans_hf.utils.hub import redact_tokens

logger = logging.get_logger(__name__)

TRACKER_PROJECT = "opentrans-hf"
EVAL_METRICS = ("mean_iou", "overall_accuracy", "mean_accuracy", "mean_iou_seen", "mean_iou_unseen")


def trackers(report_to: str | None) -> list[str] | None:
    """``--report_to`` (one tracker, or several separated by commas; ``all``: every installed one) as
    accelerate's ``log_with``. A name accelerate does not know, or a tracker whose package is not installed, is a
    ValueError at once (accelerate would only warn and log nothing); no tracker package is needed otherwise."""
    if not report_to:
        return None
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    known = [t.value for t in LoggerType]
    installed = {str(t.value) for t in get_available_trackers()}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--report_to {report_to}: {unknown[0]!r} is not a tracker; choose from {known}")
    for name in names:
        if name != "all" and name not in installed:
            raise ValueError(f"--report_to {report_to}: the {name!r} tracker's package is not installed "
                             f"(pip install {name}); installed trackers: {sorted(installed) or 'none'}")
    return names


def finish_trackers(accelerator) -> None:
    """Close the trackers (flush their files, end their runs), without ``accelerator.end_training``: that also
    destroys the process group, which hung a 2-process run after its last write (the CLI closes the group
    itself when the job is done). Every tracker is closed even when one fails (logged: closing is cleanup,
    and a run's own error must not be hidden by it); afterwards the accelerator holds none."""
    for tracker in list(accelerator.trackers):
        try:
            tracker.finish()
        except Exception as err:  # noqa: BLE001 - see above
            logger.warning(f"closing the {getattr(tracker, 'name', type(tracker).__name__)} tracker failed: {err}")
    accelerator.trackers.clear()


def tracker_value(value):
    """``value`` as every tracker takes it: a bool, int, float or str as it is, None / lists / dicts (JSON)
    and other objects as a string."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def hyperparameters(args, solver, **run) -> dict:
    """The run's hyperparameters for ``init_trackers(config=...)``: the job's flags, the solver flags replaced by
    the solver's resolved values (``learning_rate`` the float the optimizer used, not the unset flag), then
    ``run`` (the run's own numbers: its total steps, its processes)."""
    values = redact_tokens(asdict(args))  # --hub_token never reaches a tracker
    resolved = solver.to_dict()
    values.update({flag: resolved[name] for flag, name in SOLVER_FLAGS.items()})
    values.update(run)
    return {key: tracker_value(value) for key, value in values.items()}


def tracker_name(name: str) -> str:
    """A dataset name as a part of a metric name every tracker accepts (mlflow refuses ``:``): letters, digits,
    ``_ - . /`` and spaces kept, anything else ``_`` (``embedded:validation`` -> ``embedded_validation``)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def eval_scalars(results: dict) -> dict:
    """``{"eval/<dataset>/<metric>": value}`` of an evaluation's results (per dataset; the metrics it has)."""
    return {f"eval/{tracker_name(name)}/{key}": float(res[key])
            for name, res in results.items() for key in EVAL_METRICS if res.get(key) is not None}


def switch_scalars(record: dict) -> dict:
    """The spectral switch (a ``switch_record``) as numbers: its step and how many layers it froze / trains."""
    return {"spectral/switch_step": record["step"], "spectral/frozen_layers": len(record["frozen_layers"]),
            "spectral/trainable_layers": len(record["trainable_layers"])}


@dataclass
class Throughput:
    """Images and time of the optimizer step under way: ``count`` each micro-batch, ``scalars`` at the step's end,
    ``restart`` after what is not training (evaluation, the switch, a checkpoint)."""

    num_processes: int = 1
    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def count(self, batch_size: int) -> None:
        self.images += batch_size

    def restart(self) -> None:
        self.images, self.start = 0, time.perf_counter()

    def scalars(self) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {"train/steps_per_second": 1.0 / seconds,
                "train/images_per_second": self.images * self.num_processes / seconds}
