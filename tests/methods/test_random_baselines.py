"""The paper's Random(...) baselines: a random choice of the same size as the method it is compared with.

freeze_rule="random" (as many layers frozen as the median rule, drawn by a seed), magnitude_prune(...,
scope="random") (global count, or like= another mask's per-layer counts), IMP and `prune --scope random`
(nested random masks per round); each seeded and recorded in its adapter's config."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import (
    IMPConfig,
    SparseMask,
    SpectralTuningConfig,
    get_spectral_model,
    iterative_magnitude_prune,
    magnitude_prune,
)
from opentrans_hf.commands import parse_args
from opentrans_hf.data import SegmentationTransform, embedded_dataset
from opentrans_hf.data.splits import SegmentationSplit, make_loader
from opentrans_hf.methods.spectral_tuning import block_of, frozen_units

VISION = r"encoder\.layers\.\d+\..*"


@pytest.fixture
def vision(tiny_clip_dir):
    return CLIPVisionModel.from_pretrained(tiny_clip_dir)


def encoder_linears(model, prefix=""):
    return [(n, m) for n, m in model.named_modules() if n.startswith(prefix + "encoder.layers.") and isinstance(m, nn.Linear)]


def fake_alphas(model):
    """Distinct alphas for the encoder's layers (the rules only need numbers; no analysis, fast)."""
    return {n: 2.0 + 0.37 * ((7 * i) % 12) + 0.05 * i for i, (n, _) in enumerate(encoder_linears(model))}


def n_pruned(mask: SparseMask) -> int:
    return sum(int((~m).sum()) for m in mask.masks.values())


# ---- freeze_rule="random" -------------------------------------------------------------------------
def test_random_rule_freezes_as_many_as_median_seeded():
    alphas = {f"encoder.layers.{i // 6}.m{i % 6}": float((5 * i) % 13) for i in range(12)}
    median = frozen_units(alphas, "median")
    draws = [frozen_units(alphas, "random", seed=s) for s in range(6)]
    assert all(len(d) == len(median) == 6 for d in draws) and all(d <= set(alphas) for d in draws)
    assert frozen_units(alphas, "random", seed=3) == draws[3]  # deterministic per seed
    assert len({frozenset(d) for d in draws}) > 1  # different across seeds
    assert any(d != median for d in draws)  # not the alpha rule in disguise
    # the draw does not depend on the order of the alphas (a saved config's JSON has sorted keys)
    shuffled = dict(sorted(alphas.items(), reverse=True))
    assert frozen_units(shuffled, "random", seed=3) == draws[3]


def test_random_rule_on_a_model_recorded_in_the_adapter_config(vision, tmp_path):
    alphas = fake_alphas(vision)
    median = get_spectral_model(copy.deepcopy(vision), SpectralTuningConfig(target_modules=VISION, layer_alphas=dict(alphas)))
    frozen = {}
    for seed in (0, 1, 2):
        cfg = SpectralTuningConfig(target_modules=VISION, freeze_rule="random", seed=seed, layer_alphas=dict(alphas))
        model = get_spectral_model(copy.deepcopy(vision), cfg)
        frozen[seed] = set(model.frozen_layers)
        assert len(frozen[seed]) == len(median.frozen_layers) == 6
        modules = dict(model.base_model.named_modules())
        for name in alphas:
            assert modules[name].weight.requires_grad is (name not in frozen[seed]), name
    again = get_spectral_model(copy.deepcopy(vision), SpectralTuningConfig(
        target_modules=VISION, freeze_rule="random", seed=1, layer_alphas=dict(alphas)))
    assert set(again.frozen_layers) == frozen[1]
    assert len({frozenset(f) for f in frozen.values()}) > 1
    # the adapter config says which it was: the rule and its seed, and reloads to the same choice
    path = cfg.save_pretrained(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["freeze_rule"] == "random" and saved["seed"] == 2
    reloaded = SpectralTuningConfig.from_pretrained(tmp_path)
    reloaded.trainable_layers = None  # re-decide from the saved (sorted) alphas: the same layers
    assert set(alphas) - set(get_spectral_model(copy.deepcopy(vision), reloaded).trainable_layers) == frozen[2]
    with pytest.raises(ValueError, match="seed must be an integer"):
        SpectralTuningConfig(freeze_rule="random", seed="1")


def test_random_rule_with_block_granularity(vision):
    alphas = fake_alphas(vision)
    seen = set()
    for seed in range(8):
        m = get_spectral_model(copy.deepcopy(vision), SpectralTuningConfig(
            target_modules=VISION, freeze_rule="random", granularity="block", seed=seed, layer_alphas=dict(alphas)))
        blocks = {block_of(n) for n in m.frozen_layers}
        assert len(blocks) == 1  # the median rule freezes 1 of the 2 blocks
        assert set(m.frozen_layers) == {n for n in alphas if block_of(n) in blocks}  # whole blocks
        seen |= blocks
    assert seen == {"encoder.layers.0", "encoder.layers.1"}


def test_train_and_demo_accept_the_random_rule():
    assert parse_args("train", ["--freeze_rule", "random"]).freeze_rule == "random"
    assert parse_args("demo", ["--freeze_rule", "random"]).freeze_rule == "random"


def test_train_draws_the_random_rule_with_its_seed(tiny_clip_dir, tmp_path):
    """`train --freeze_rule random --seed N`: the run's seed draws the layers and the adapter records it."""
    from opentrans_hf.commands import train

    frozen = {}
    for seed in (3, 4):
        out = tmp_path / f"seed{seed}"
        train.run(parse_args("train", ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out),
                                       "--freeze_rule", "random", "--seed", str(seed), "--max_steps", "1",
                                       "--batch_size", "4", "--embedded_size", "8", "--max_eval_examples", "2"]))
        cfg = SpectralTuningConfig.from_pretrained(out / "model" / "spectral_adapter")
        assert (cfg.freeze_rule, cfg.seed) == ("random", seed)
        frozen[seed] = set(cfg.layer_alphas) - set(cfg.trainable_layers)
    median = len(frozen_units({n: a for n, a in cfg.layer_alphas.items()}, "median"))
    assert all(len(f) == median for f in frozen.values()) and frozen[3] != frozen[4]


# ---- magnitude_prune(scope="random") ---------------------------------------------------------------
@pytest.mark.parametrize("amount", [0.3, 0.9])
def test_random_global_prunes_as_many_as_global_magnitude(vision, amount):
    mask = magnitude_prune(vision, amount, scope="random", seed=0)
    layers = encoder_linears(vision)
    assert set(mask.masks) == {f"{n}.weight" for n, _ in layers}  # the same target layers
    assert n_pruned(mask) == n_pruned(magnitude_prune(vision, amount))  # exactly the global count
    ref = copy.deepcopy(vision)  # torch's global random pruning prunes the same number
    prune.global_unstructured([(m, "weight") for _, m in encoder_linears(ref)], pruning_method=prune.RandomUnstructured,
                              amount=amount)
    assert n_pruned(mask) == sum(int((m.weight_mask == 0).sum()) for _, m in encoder_linears(ref))
    for n, s in mask.layer_sparsity().items():  # spread over every layer (uniform draw), not one threshold
        assert s == pytest.approx(amount, abs=0.1), n
    assert torch.equal(torch.cat([m.flatten() for m in mask.masks.values()]),
                       torch.cat([m.flatten() for m in magnitude_prune(vision, amount, scope="random", seed=0).masks.values()]))
    other = magnitude_prune(vision, amount, scope="random", seed=1)
    assert any(not torch.equal(mask.masks[n], other.masks[n]) for n in mask.masks)
    assert (mask.method, mask.extra, mask.target_sparsity) == ("random-global", {"seed": 0}, amount)
    assert other.extra == {"seed": 1}
    # the model is not changed, and the draw ignores the global RNG
    torch.manual_seed(123)
    assert all(torch.equal(mask.masks[n], m) for n, m in
               magnitude_prune(vision, amount, scope="random", seed=0).masks.items())


def test_random_like_matches_per_layer_counts(vision, tiny_clip_dir, tmp_path):
    alphas = {n: float(i) for i, (n, _) in enumerate(encoder_linears(vision))}
    like = magnitude_prune(vision, 0.5, scope="alpha", alphas=alphas)  # a different sparsity in every layer
    assert len({round(s, 3) for s in like.layer_sparsity().values()}) > 3
    mask = magnitude_prune(vision, None, scope="random", like=like, seed=4)
    assert set(mask.masks) == set(like.masks)
    for n, m in mask.masks.items():
        assert int((~m).sum()) == int((~like.masks[n]).sum()), n
        assert not torch.equal(m, like.masks[n]), n
    # per layer what torch.nn.utils.prune.random_unstructured draws at that layer's sparsity
    ref = copy.deepcopy(vision)
    for n, module in encoder_linears(ref):
        prune.random_unstructured(module, "weight", amount=like.layer_sparsity()[f"{n}.weight"])
        assert int((module.weight_mask == 0).sum()) == int((~mask.masks[f"{n}.weight"]).sum()), n
    assert mask.method == "random-like" and mask.extra == {"seed": 4, "like_method": "magnitude-alpha",
                                                          "like_base_model": like.base_model_name_or_path}
    assert mask.sparsity == pytest.approx(like.sparsity)
    same = magnitude_prune(vision, like.sparsity, scope="random", like=like, seed=4)
    assert all(torch.equal(mask.masks[n], same.masks[n]) for n in mask.masks)
    assert any(not torch.equal(mask.masks[n], m) for n, m in
               magnitude_prune(vision, None, scope="random", like=like, seed=5).masks.items())
    # recorded in the saved adapter
    mask.save_pretrained(tmp_path / "random")
    loaded = SparseMask.from_pretrained(tmp_path / "random")
    assert loaded.method == "random-like" and loaded.extra["seed"] == 4
    # like= resolves by canonical names: a CLIPModel (vision_model. prefix) gets the same draw
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    on_clip = magnitude_prune(clip, None, scope="random", like=like, seed=4)
    assert all(torch.equal(mask.masks[n], on_clip.masks[n]) for n in mask.masks)


def test_random_scope_errors(vision):
    like = magnitude_prune(vision, 0.5, scope="layerwise")
    with pytest.raises(ValueError, match=r"sparsity=0\.8 disagrees with like="):
        magnitude_prune(vision, 0.8, scope="random", like=like)
    with pytest.raises(ValueError, match="needs scope='random'"):
        magnitude_prune(vision, 0.5, like=like)
    with pytest.raises(ValueError, match="no target_modules"):
        magnitude_prune(vision, None, scope="random", like=like, target_modules=["fc1"])
    bad = SparseMask({"encoder.layers.9.mlp.fc1.weight": torch.ones(37, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"encoder\.layers\.9\.mlp\.fc1\.weight"):
        magnitude_prune(vision, None, scope="random", like=bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        magnitude_prune(vision, None, scope="random")
    with pytest.raises(ValueError, match="seed must be an integer"):
        magnitude_prune(vision, 0.5, scope="random", seed=1.5)


def test_random_on_a_masked_model_prunes_among_survivors(vision):
    first = magnitude_prune(vision, 0.5, scope="random", seed=0)
    first.apply(vision)
    second = magnitude_prune(vision, 0.75, scope="random", seed=1)
    for n, m in first.masks.items():
        assert not (second.masks[n] & ~m).any(), f"{n}: a pruned weight came back"
    assert n_pruned(second) == round(0.75 * second.num_weights)


# ---- IMP and the prune job -----------------------------------------------------------------------
def _loader():
    ds = embedded_dataset("train", num_train=4, image_size=30)
    return make_loader(SegmentationSplit(ds, "image", "label", [], SegmentationTransform(30, train=True)), batch_size=4, shuffle=False)


def _imp(tiny_clip_dir, out, **kw):
    cfg = IMPConfig(rate=0.3, steps_per_round=0, output_dir=str(out), **{"num_rounds": 3, **kw})
    iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), _loader(), cfg, progress=False)
    return [SparseMask.from_pretrained(out / f"round_{r:02d}") for r in range(1, cfg.num_rounds + 1)]


def test_imp_random_scope_nested_seeded_and_recorded(tiny_clip_dir, tmp_path):
    rounds = _imp(tiny_clip_dir, tmp_path / "a", scope="random", seed=7)
    cfg = IMPConfig(rate=0.3, num_rounds=3)
    for r, (prev, cur) in enumerate(zip([None, *rounds], rounds), start=1):
        assert n_pruned(cur) == round(cfg.sparsity_after(r) * cur.num_weights)  # as many as a magnitude round
        if prev is not None:
            assert all(not (cur.masks[n] & ~prev.masks[n]).any() for n in cur.masks), f"round {r} not nested"
        assert cur.method == "imp-random" and cur.extra["seed"] == 7 and cur.extra["round"] == r
    magnitude = _imp(tiny_clip_dir, tmp_path / "m", num_rounds=1)[0]
    assert any(not torch.equal(magnitude.masks[n], rounds[0].masks[n]) for n in magnitude.masks)
    # the same seed, the same masks; a resumed run draws what an uninterrupted one does
    _imp(tiny_clip_dir, tmp_path / "b", scope="random", seed=7, num_rounds=1)
    resumed = _imp(tiny_clip_dir, tmp_path / "b", scope="random", seed=7)
    for a, b in zip(rounds, resumed):
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    with pytest.raises(ValueError, match="random_mask_seed: 7 in the saved state, 8 now"):  # resuming another draw
        _imp(tiny_clip_dir, tmp_path / "b", scope="random", seed=8, num_rounds=4)
    other = _imp(tiny_clip_dir, tmp_path / "c", scope="random", seed=8, num_rounds=1)[0]
    assert any(not torch.equal(other.masks[n], rounds[0].masks[n]) for n in other.masks)
    with pytest.raises(ValueError, match="unknown scope 'bogus'"):
        IMPConfig(scope="bogus")


def test_prune_job_random_scope_uses_seed(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import prune as prune_job

    args = parse_args("prune", ["--model_name_or_path", str(tiny_clip_dir), "--scope", "random", "--seed", "3",
                                "--num_rounds", "1", "--rate", "0.4", "--steps_per_round", "0", "--embedded_size", "4",
                                "--batch_size", "4", "--output_dir", str(tmp_path)])
    prune_job.run(args)
    mask = SparseMask.from_pretrained(tmp_path / "mask")
    assert mask.method == "imp-random" and mask.extra["seed"] == 3
    assert mask.sparsity == pytest.approx(0.4, abs=1e-3)
