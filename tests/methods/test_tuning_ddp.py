"""Spectral tuning under Accelerate DDP with 2 CPU processes (gloo): freezing before prepare, the
unused-parameter helper, and identical trainable weights on both ranks after training."""

import json

import pytest
from conftest import HELPERS, launch_two_processes


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_ddp_training(tmp_path, tiny_clip_dir):
    script = HELPERS / "ddp_spectral_train.py"
    res = launch_two_processes(script, tiny_clip_dir, tmp_path, port=29611)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2
        assert set(rep["unused"]) == {"base_model.vision_model.post_layernorm.weight", "base_model.vision_model.post_layernorm.bias"}
        assert rep["frozen_unchanged"] and rep["trainable_changed"]
        assert any("encoder.layers" in n for n in rep["frozen"])  # spectral freezing happened
    assert reports[0]["frozen"] == reports[1]["frozen"]
    assert reports[0]["trainable_sums"] == reports[1]["trainable_sums"]  # DDP kept the ranks in sync
