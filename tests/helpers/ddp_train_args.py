"""Run by test_training_guards.py under `accelerate launch` with 2 processes: the `train` job with the
arguments given. Each rank writes what happened to it (rank{r}.json: ok, or the error).

FAKE_NONFINITE_STEP=N makes process 1 alone see a NaN loss at optimizer step N (its gradients and
weights stay finite), to check that both processes stop together at that step.
FAKE_SAVE_FAILURE=N makes process 1 alone fail writing its part of the N-th checkpoint (disk full), to check
that the main process hears of it instead of waiting for process 1 at a barrier.
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

import opentrans_hf.training.divergence as divergence
import opentrans_hf.training.trainer as trainer
from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.utils.distributed import cpu_only_multiprocess

args = parse_args("train", sys.argv[1:])
state = PartialState(cpu=cpu_only_multiprocess())  # as the job's own Accelerator: gloo DDP on CPU
fake_step = int(os.environ.get("FAKE_NONFINITE_STEP", "0"))
if fake_step:
    real_step_problem, calls = divergence.step_problem, []

    def step_problem(accelerator, losses, named_params, check_grads=True):
        calls.append(1)
        if state.process_index == 1 and len(calls) == fake_step:
            losses = torch.full_like(losses, float("nan"))
        return real_step_problem(accelerator, losses, named_params, check_grads)

    divergence.step_problem = trainer.step_problem = step_problem  # the trainer's own reference too

fake_save = int(os.environ.get("FAKE_SAVE_FAILURE", "0"))
if fake_save:
    from accelerate import Accelerator

    real_save_state, saves = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        saves.append(1)
        if state.process_index == 1 and len(saves) == fake_save:
            raise OSError(28, "No space left on device", str(output_dir))
        return real_save_state(self, output_dir, **kwargs)

    Accelerator.save_state = save_state

report = Path(args.output_dir).parent / f"rank{state.process_index}.json"
try:
    metrics = run_training(args)
except Exception as err:
    report.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
    raise
report.write_text(json.dumps({"ok": True, "steps": metrics["steps"]}))
