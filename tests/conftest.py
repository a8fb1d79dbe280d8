import logging
import os

import pytest
import torch

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
