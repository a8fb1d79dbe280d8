"""Run by test_training_guards.py / test_output_dir_lock.py as a subprocess: the `train` job with the
arguments given, made slow while it writes one checkpoint so that the test can act in the middle of
that write (start a second run, or kill -9 this one).

Environment: SLOW_CHECKPOINT_STEP=N (the checkpoint of step N is slow), SLOW_CHECKPOINT_MARKER=FILE
(written, with this process's pid, once the state of step N is on disk and the write is not finished).
"""

import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training

STEP = os.environ["SLOW_CHECKPOINT_STEP"]
MARKER = Path(os.environ["SLOW_CHECKPOINT_MARKER"])
_save_state = Accelerator.save_state


def slow_save_state(self, output_dir=None, **kwargs):
    result = _save_state(self, output_dir, **kwargs)
    name = Path(output_dir).name
    if name == f"step_{STEP}" or name.startswith(f".step_{STEP}."):  # the final name, or a temporary one
        MARKER.write_text(str(os.getpid()))
        time.sleep(600)  # the test kills us meanwhile
    return result


Accelerator.save_state = slow_save_state
run_training(parse_args("train", sys.argv[1:]))
