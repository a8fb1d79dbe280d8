"""Run by tests/training/test_fsdp.py under `accelerate launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml`
(FSDP2, 2 processes on CPU): a short run with spectral tuning (part of the encoder frozen) and a sparse mask,
evaluated and checkpointed at step 2; then the same run resumed from that checkpoint in another directory. Each rank
writes what it saw."""

import json
import shutil
import sys
from pathlib import Path

from accelerate import PartialState

from opentrans_hf.commands import parse_args
from opentrans_hf.commands.train import run as run_training
from opentrans_hf.training import trainer

whole = []  # per run: this process's own copy of the weights FSDP2 does not shard (the 0-dim logit scales)
_finish = trainer._finish


def finish(accelerator, args, out, run, *rest):
    model = accelerator.unwrap_model(run.model)
    whole.append({n: p.item() for n, p in model.named_parameters() if p.dim() == 0})
    return _finish(accelerator, args, out, run, *rest)


trainer._finish = finish
clip_dir, root, mask = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
# 5 evaluation examples in batches of 2: the processes' shards are 3 and 2 examples, 2 and 1 forwards
common = ["--model_name_or_path", clip_dir, "--max_steps", "4", "--batch_size", "2", "--embedded_size", "8",
          "--freeze_rule", "median", "--mask", mask, "--max_eval_examples", "5", "--learning_rate", "1e-3",
          "--checkpointing_steps", "2", "--eval_steps", "2"]
metrics = run_training(parse_args("train", [*common, "--output_dir", str(root / "a")]))
state = PartialState()
kind = state.distributed_type.name
if state.is_main_process:
    shutil.copytree(root / "a" / "step_2", root / "b" / "step_2")
state.wait_for_everyone()
resumed = run_training(parse_args("train", [*common, "--output_dir", str(root / "b"),
                                            "--resume_from_checkpoint", "latest"]))
(root / f"rank{state.process_index}.json").write_text(json.dumps({
    "world": state.num_processes, "distributed_type": kind, "metrics": metrics, "resumed": resumed, "whole": whole}))
