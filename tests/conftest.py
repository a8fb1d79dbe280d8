import logging
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
"""The repository's root."""
HELPERS = Path(__file__).resolve().parent / "helpers"
"""Scripts the tests launch in other processes."""

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random-initialised tiny CLIPModel checkpoint + tokenizer saved locally (make_random_clip)."""
    from opentrans_hf import make_random_clip

    return make_random_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vision(tiny_clip_dir):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(tiny_clip_dir)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def info_logs():
    """The library's log at INFO for one test, as under the ``opentrans-hf`` command: its progress lines go to
    stderr (``capsys.readouterr().err``)."""
    from opentrans_hf.utils import logging as library_logging

    previous = library_logging.get_verbosity()
    library_logging.set_verbosity_info()
    yield
    library_logging.set_verbosity(previous)


def launch_two_processes(script, *args, port: int, env: dict | None = None, timeout: int = 600,
                         config_file: Path | None = None):
    """Run ``script args`` as 2 processes with ``accelerate launch`` and return the finished process.

    ``--multi_gpu`` is Accelerate's torchrun launcher; without GPUs the 2 processes run on CPU with gloo
    (``--cpu`` alone would start a single process unless mpirun is set up). ``config_file``: an accelerate
    config of 2 processes to launch with instead (e.g. ``configs/accelerate/fsdp_cpu_2proc.yaml``)."""
    import subprocess
    import sys

    launcher = (["--config_file", str(config_file)] if config_file is not None else
                ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--dynamo_backend", "no",
           "--main_process_port", str(port), str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
