"""scripts/bench_pipeline.py --quick runs (tiny CLIP) and ends with its JSON line: the pipeline's label maps equal
model.predict's, every ratio a positive finite number. Timing thresholds are never tested (shared, noisy CPUs)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("hand_loop_b1", "predict", "pipeline_b1", "pipeline_b8", "pipeline_masks")


@pytest.mark.slow
def test_bench_pipeline_quick_ends_with_json():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pipeline.py"), "--quick", "--rounds", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("pipeline_label_map_equals_predict") is True
    assert sorted(result) == sorted([f"{v}_vs_hand_loop" for v in VARIANTS]
                                    + [f"{v}_images_per_second" for v in ("hand_loop", *VARIANTS)]
                                    + ["pipeline_b1_vs_hand_loop_b1"])
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in result.values()), result
