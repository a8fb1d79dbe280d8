"""The README's Python code blocks run as written.

Only what cannot exist offline, or would take hours, is swapped (``SWAPS``): the Hub CLIP becomes a
local random tiny CLIP (with the image processor a Hub CLIP repo has), the paper's schedules become a
couple of steps; a folder of images is provided, and the Hub is a local folder (``push_to_hub``
writes to it, ``from_pretrained`` of a Hub id reads from it)."""

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"
SWAPS = {  # README text -> what the test runs instead (each must occur in a python block)
    "openai/clip-vit-base-patch16": None,  # the local tiny CLIP (fixture)
    "num_rounds=22, steps_per_round=5000": "num_rounds=2, steps_per_round=1",  # IMP: the paper's schedule
    "max_steps=20000": "max_steps=2, embedded_size=16, max_eval_examples=8",  # training: 2 steps, small data
}


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """(section title, line number, code) of every ```python block."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        titles = re.findall(r"^#+ (.+)$", text[: m.start()], flags=re.M)
        blocks.append((titles[-1] if titles else "", line, m.group(1)))
    return blocks


@pytest.fixture
def local_clip(tmp_path, tiny_clip_dir):
    """The tiny CLIP plus a CLIPImageProcessor for its input size, as a Hub CLIP repo has."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    d = shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    size = CLIPVisionConfig.from_pretrained(d).image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(d)
    return d


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """The Hub as a local folder: uploads copy there, downloads read from there."""
    root = tmp_path / "hub"

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        shutil.rmtree(root / repo_id, ignore_errors=True)
        shutil.copytree(folder_path, root / repo_id)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def hf_hub_download(repo_id, filename, **kwargs):
        path = root / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # push_to_hub refuses offline; the Hub is the folder above
    return root


def test_readme_has_the_api_snippets():
    titles = [title for title, _, _ in python_blocks(README.read_text())]
    for section in ("Spectral analysis", "Spectral tuning", "Sparse masks", "OVS frameworks"):
        assert section in titles, f"no ```python block under '## {section}' in the README"


def test_readme_python_blocks_run(tmp_path, monkeypatch, local_clip, local_hub):
    text = README.read_text()
    blocks = python_blocks(text)
    swaps = {old: new if new is not None else str(local_clip) for old, new in SWAPS.items()}
    for old in swaps:
        assert any(old in code for _, _, code in blocks), f"no README python block contains {old!r}: update SWAPS"
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(work / "images" / f"{i}.jpg")
    monkeypatch.chdir(work)
    for title, line, code in blocks:
        for old, new in swaps.items():
            code = code.replace(old, new)
        try:
            exec(compile(code, f"README.md:{line} ({title})", "exec"), {"__name__": "__readme__"})
        except Exception as err:
            raise AssertionError(f"the README's python block at line {line} (section '{title}') fails: "
                                 f"{type(err).__name__}: {err}") from err
    assert (local_hub / "me" / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (local_hub / "me" / "clip-b16-sparse90" / "adapter_config.json").is_file()
