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


class FakeHub:
    """The Hub's write API as a recorder (see the ``fake_hub`` fixture). ``calls``: ``(method, arguments)``
    of every ``create_repo`` / ``create_branch`` / ``create_commit``, arguments by name (``api_token``: the
    token the ``HfApi`` was made with); ``commits()``: the ``create_commit`` arguments, with ``paths`` (the
    operations' ``path_in_repo``). Committed files are copied under ``root/<repo_id>`` (``root/<repo_id>@<branch>``
    for a branch other than main), where ``ModelCard.load`` finds a pushed card."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def commits(self) -> list[dict]:
        return [args for name, args in self.calls if name == "create_commit"]

    def repo_dir(self, repo_id: str, revision: str | None = None) -> Path:
        return self.root / (repo_id if revision in (None, "main") else f"{repo_id}@{revision}")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """``huggingface_hub.HfApi``'s ``create_repo``, ``create_branch`` and ``create_commit`` patched to record
    their calls (a :class:`FakeHub`) and keep the committed files; ``upload_folder`` / ``upload_file`` fail the
    test (a push is one ``create_commit``); ``ModelCard.load`` reads a pushed card or finds none;
    ``HF_HUB_OFFLINE`` unset. No network is touched."""
    import inspect
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = FakeHub(tmp_path / "fake-hub")

    def recorder(name, behaviour):
        real = getattr(huggingface_hub.HfApi, name)

        def fake(self, *args, **kwargs):
            bound = inspect.signature(real).bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
            arguments["api_token"] = self.token
            hub.calls.append((name, arguments))
            return behaviour(arguments)

        monkeypatch.setattr(huggingface_hub.HfApi, name, fake)

    def full_id(repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"me/{repo_id}"  # a bare name is under the token's account

    def commit(arguments):
        ops = list(arguments["operations"])
        arguments["operations"], arguments["paths"] = ops, [op.path_in_repo for op in ops]
        target = hub.repo_dir(arguments["repo_id"], arguments["revision"])
        for op in ops:
            dest = target / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = op.path_or_fileobj
            dest.write_bytes(Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src))
        n = len(hub.commits()) - 1  # this one is recorded already
        return SimpleNamespace(commit_url=f"https://huggingface.co/{arguments['repo_id']}/commit/{n:040x}", oid=f"{n:040x}")

    recorder("create_repo", lambda a: huggingface_hub.RepoUrl(f"https://huggingface.co/{full_id(a['repo_id'])}"))
    recorder("create_branch", lambda a: None)
    recorder("create_commit", commit)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a push must be one create_commit, not upload_folder / upload_file")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", refuse)

    def load_card(cls, repo_id, *args, **kwargs):
        card = hub.repo_dir(repo_id) / "README.md"
        if not card.is_file():
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return cls(card.read_text())

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(load_card))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


def kill_when(cmd, ready, *, env: dict, what: str, timeout: float = 300, poll: float = 0.01) -> int:
    """Run ``cmd`` and SIGKILL it as soon as ``ready()`` is true (failing the test if it exits first or ``what``
    never happens within ``timeout`` seconds); returns the killed process's pid."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, f"the run never {what}"
            time.sleep(poll)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.pid
