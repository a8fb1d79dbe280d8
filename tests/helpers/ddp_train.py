"""Run by test_training.py under `accelerate launch` with 2 processes: a short training run, then each
rank writes the metrics it computed."""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training

clip_dir, out, mask = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
metrics = run_training(parse_args("train", [
    "--model_name_or_path", clip_dir, "--output_dir", str(out), "--max_steps", "3", "--batch_size", "2",
    "--embedded_size", "12", "--freeze_rule", "median", "--mask", mask, "--max_eval_examples", "7",
    "--learning_rate", "1e-3",
]))
state = PartialState()
(out / f"rank{state.process_index}.json").write_text(json.dumps({"world": state.num_processes, "metrics": metrics}))
