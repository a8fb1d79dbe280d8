"""Spectral tuning under Accelerate DDP with 2 CPU processes (gloo): freezing before prepare, the
unused-parameter helper, and identical trainable weights on both ranks after training."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_process_ddp_training(tmp_path, tiny_clip_dir):
    script = Path(__file__).parent / "ddp_spectral_train.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # `--multi_gpu` is Accelerate's torchrun launcher; without GPUs the processes run on CPU with gloo
    # (`--cpu` alone would start a single process unless mpirun is set up)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29611",
           str(script), str(tiny_clip_dir), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2
        assert set(rep["unused"]) == {"base_model.vision_model.post_layernorm.weight", "base_model.vision_model.post_layernorm.bias"}
        assert rep["frozen_unchanged"] and rep["trainable_changed"]
        assert any("encoder.layers" in n for n in rep["frozen"])  # spectral freezing happened
    assert reports[0]["frozen"] == reports[1]["frozen"]
    assert reports[0]["trainable_sums"] == reports[1]["trainable_sums"]  # DDP kept the ranks in sync
