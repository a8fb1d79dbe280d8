"""Run by test_spectral_warmup.py under `accelerate launch` with 2 processes: a run with a spectral warm-up
(alpha measured after 1 step, then the small-alpha layers frozen and DDP re-wrapped), then the same run
resumed from its checkpoint after the switch in another directory. Each rank writes what it saw."""

import json
import shutil
import sys
from pathlib import Path

from accelerate import PartialState

from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training

clip_dir, root = sys.argv[1], Path(sys.argv[2])
common = ["--model_name_or_path", clip_dir, "--max_steps", "3", "--batch_size", "2", "--embedded_size", "12",
          "--freeze_rule", "median", "--spectral_warmup_steps", "1", "--max_eval_examples", "2",
          "--learning_rate", "1e-3", "--checkpointing_steps", "2"]
metrics = run_training(parse_args("train", [*common, "--output_dir", str(root / "a")]))
state = PartialState()
if state.is_main_process:
    shutil.copytree(root / "a" / "step_2", root / "b" / "step_2")
state.wait_for_everyone()
resumed = run_training(parse_args("train", [*common, "--output_dir", str(root / "b"),
                                            "--resume_from_checkpoint", "latest"]))
(root / f"rank{state.process_index}.json").write_text(json.dumps({
    "world": state.num_processes, "metrics": metrics, "resumed": resumed}))
