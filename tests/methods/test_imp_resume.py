"""IMP resume: a round's student weights and state are written in one step (a kill cannot pair one
round's weights with another round's state), a state made with other settings is not resumed, and a
resumed run is bit-identical to an uninterrupted one also with a shuffled, augmented loader and a dataset
drawing from the global generators (their states are saved with each round)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel

import opentrans_hf.methods.sparse_mask.imp as imp
from opentrans_hf import IMPConfig, SparseMask, iterative_magnitude_prune
from opentrans_hf.commands import parse_args
from opentrans_hf.data import SegmentationTransform, embedded_dataset
from opentrans_hf.data.splits import SegmentationSplit, make_loader


class Killed(BaseException):
    """Stands for the process dying at that point."""


def loader():
    # fixed order, no augmentation: an interrupted + resumed run must end exactly as an uninterrupted one
    ds = embedded_dataset("train", num_train=8, image_size=30)
    split = SegmentationSplit(ds, "image", "label", [], SegmentationTransform(30, train=False))
    return make_loader(split, batch_size=4, shuffle=False)


def config(out, **kw):
    return IMPConfig(**{"rate": 0.2, "num_rounds": 2, "steps_per_round": 2, "learning_rate": 1e-2,
                        "output_dir": str(out), **kw})


def prune(tiny_clip_dir, cfg, **kw):
    return iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), loader(), cfg, progress=False, **kw)


@pytest.fixture
def one_thread():
    """Bitwise-reproducible CPU training (several intra-op threads may sum in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("killed_writing", ["state.json", "student.safetensors"])
def test_killed_between_round_writes_resumes_from_matching_weights(tiny_clip_dir, tmp_path, monkeypatch, one_thread,
                                                                   killed_writing):
    prune(tiny_clip_dir, config(tmp_path / "whole"))
    whole = load_file(tmp_path / "whole" / "student.safetensors")

    out = tmp_path / "killed"
    writes = {"atomic_write_text": imp.atomic_write_text, "atomic_write_with": imp.atomic_write_with}

    def dying(real):
        def write(path, *a, **k):
            if str(path).endswith(killed_writing) and (out / "round_02").is_dir():  # round 2's mask is saved
                raise Killed(f"killed while writing {path}")
            return real(path, *a, **k)
        return write

    monkeypatch.setattr(imp, "atomic_write_text", dying(writes["atomic_write_text"]))
    monkeypatch.setattr(imp, "atomic_write_with", dying(writes["atomic_write_with"]))
    with pytest.raises(Killed):  # dies in round 2, after its mask was saved
        prune(tiny_clip_dir, config(out))
    monkeypatch.undo()
    prune(tiny_clip_dir, config(out))  # resume
    resumed = load_file(out / "student.safetensors")
    assert resumed.keys() == whole.keys()
    for k in whole:  # the same weights as the run that was never interrupted (no round trained twice)
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0, msg=k)
    state = json.loads((out / "state.json").read_text())
    assert state["round"] == 2 and [h["round"] for h in state["history"]] == [1, 2]
    assert SparseMask.from_pretrained(out / "round_02") == SparseMask.from_pretrained(tmp_path / "whole" / "round_02")


def test_resume_refuses_other_settings_listing_them(tiny_clip_dir, tmp_path):
    prune(tiny_clip_dir, config(tmp_path / "a", num_rounds=1))
    # this used to resume silently, pruning on at another rate / scope
    with pytest.raises(ValueError, match=r"other settings: rate: 0\.2 in the saved state, 0\.3 now; scope: 'global' in "
                                         r"the saved state, 'layerwise' now.*--ignore_checkpoint_mismatch"):
        prune(tiny_clip_dir, config(tmp_path / "a", rate=0.3, scope="layerwise"))
    # the caller's own settings (the prune job: dataset, seed, batch size, ...) are compared too
    run = {"dataset": "embedded", "seed": 0}
    prune(tiny_clip_dir, config(tmp_path / "b", num_rounds=1), fingerprint=run)
    with pytest.raises(ValueError, match=r"seed: 0 in the saved state, 1 now"):
        prune(tiny_clip_dir, config(tmp_path / "b"), fingerprint={**run, "seed": 1})
    # more rounds of the same run is a resume, not a mismatch; so is an explicit override
    mask = prune(tiny_clip_dir, config(tmp_path / "b", num_rounds=2), fingerprint=run)
    assert mask.sparsity == pytest.approx(1 - 0.8**2, abs=1e-3)
    prune(tiny_clip_dir, config(tmp_path / "b", num_rounds=3, learning_rate=1e-3, ignore_mismatch=True), fingerprint=run)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["round"] == 3


def test_prune_job_refuses_another_model_and_batch_size(tiny_clip_dir, tmp_path):
    import shutil

    from opentrans_hf.commands import prune as prune_job

    other_clip = tmp_path / "other-clip"
    shutil.copytree(tiny_clip_dir, other_clip)
    base = ["--output_dir", str(tmp_path / "run"), "--num_rounds", "1", "--steps_per_round", "1", "--embedded_size", "8",
            "--batch_size", "4"]
    prune_job.run(parse_args("prune", ["--model_name_or_path", str(tiny_clip_dir), *base]))
    again = ["--model_name_or_path", str(other_clip), *base, "--num_rounds", "2", "--batch_size", "2"]
    with pytest.raises(ValueError, match=r"batch_size: 4 in the saved state, 2 now; model: .* now"):
        prune_job.run(parse_args("prune", again))
    result = prune_job.run(parse_args("prune", [*again, "--ignore_checkpoint_mismatch"]))
    assert result["sparsity"] == pytest.approx(0.19, abs=1e-3)


def test_state_of_an_older_layout_is_refused_clearly(tiny_clip_dir, tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"round": 1, "history": []}))
    with pytest.raises(ValueError, match=r"older opentrans-hf .*--no_resume"):
        prune(tiny_clip_dir, config(tmp_path))


class GlobalNoise(torch.utils.data.Dataset):
    """A dataset drawing from torch's, numpy's and Python's global generators (as users' datasets do)."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def set_epoch(self, epoch):  # Accelerate passes its pass count on: the split's augmentations draw with it
        self.split.set_epoch(epoch)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.split[i]
        noise = 0.1 * torch.rand(()) + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        return x + noise, y


def shuffled_loader(noise=False):
    # shuffled, augmented (the training transform), 8 images in batches of 3: each round restarts the loader
    # mid-epoch; the generator's state and Accelerate's pass count (the augmentations' epoch) carry across rounds
    ds = embedded_dataset("train", num_train=8, image_size=30)
    split = SegmentationSplit(ds, "image", "label", [], SegmentationTransform(30, train=True), seed=0)
    return make_loader(GlobalNoise(split) if noise else split, batch_size=3, shuffle=True, seed=0)


@pytest.mark.parametrize("noise", [False, True], ids=["augmented", "global-rngs"])
def test_resume_with_a_shuffled_augmented_loader_is_bit_identical(tiny_clip_dir, tmp_path, one_thread, noise):
    def run(out, rounds):
        cfg = config(out, num_rounds=rounds, steps_per_round=4)
        return iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), shuffled_loader(noise), cfg,
                                         progress=False)

    from accelerate.utils import set_seed

    set_seed(0)  # as the prune job does first (torch, numpy, Python)
    whole = run(tmp_path / "whole", 3)
    set_seed(0)
    run(tmp_path / "resumed", 1)
    set_seed(123)  # a new process: other global generator states until the saved ones are restored
    resumed = run(tmp_path / "resumed", 3)  # resumes after round 1
    assert resumed.masks.keys() == whole.masks.keys()
    assert all(torch.equal(resumed.masks[k], whole.masks[k]) for k in whole.masks)
    a, b = load_file(tmp_path / "resumed" / "student.safetensors"), load_file(tmp_path / "whole" / "student.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    history = lambda d: json.loads((tmp_path / d / "state.json").read_text())["history"]
    assert history("resumed") == history("whole")


def test_state_without_rng_record_resumes_with_a_warning(tiny_clip_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), shuffled_loader(),
                              config(tmp_path, num_rounds=1), progress=False)
    path = tmp_path / "student.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != imp.RNG_KEY}  # as written before the record
    save_file(load_file(path), str(path), metadata=metadata)
    capsys.readouterr()
    mask = iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), shuffled_loader(),
                                     config(tmp_path, num_rounds=2), progress=False)
    assert mask.sparsity == pytest.approx(0.36, abs=1e-3)
    assert f"{path} records no RNG states (saved by an older opentrans-hf)" in capsys.readouterr().err
    assert json.loads(imp._student_metadata(tmp_path)[imp.RNG_KEY])["generators"]  # the new round has one again


def test_unreadable_rng_record_is_named(tiny_clip_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), shuffled_loader(),
                              config(tmp_path, num_rounds=1), progress=False)
    path = tmp_path / "student.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), imp.RNG_KEY: "{not json"}
    save_file(load_file(path), str(path), metadata=metadata)
    with pytest.raises(ValueError, match=rf"the RNG states in {path} are not valid JSON"):
        iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), shuffled_loader(),
                                  config(tmp_path, num_rounds=2), progress=False)
