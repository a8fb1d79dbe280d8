"""Run by tests/training/test_distributed_runs.py under `accelerate launch` with 2 processes: the pretrained
embedded CLIP built into an empty cache while a process group exists (the main process builds, evaluating the
CLIP on its own; the other waits), as the jobs' default CLIP is on a fresh machine."""

import json
import sys
from pathlib import Path

from opentrans_hf.training.pretraining import pretrained_clip
from opentrans_hf.utils.distributed import make_state

cache, out = Path(sys.argv[1]), Path(sys.argv[2])
state = make_state()
path = pretrained_clip("tiny", 0, cache_dir=cache, state=state, progress=False)
(out / f"rank{state.process_index}.json").write_text(json.dumps({"world": state.num_processes, "path": str(path)}))
