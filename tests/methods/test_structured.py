"""Structured subnetworks (whole heads and neurons), compaction to a smaller model on every host of the
CLIP vision tower, and the per-layer cap against layer collapse."""

import copy
import json
import warnings

import pytest
import torch
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf import IMPConfig, SparseMask, iterative_magnitude_prune, magnitude_prune
from opentrans_hf.embedded.random_clip import build_random_clip_vision
from opentrans_hf.methods.sparse_mask import RemovedAttention, RemovedMLP
from opentrans_hf.models import FRAMEWORKS

HIDDEN, HEADS, HEAD_DIM, NEURONS, LAYERS = 32, 4, 8, 37, 2  # the tiny CLIP's vision tower
OVERRIDES = {"deeplabv3": dict(aspp_channels=16)}
M2F = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64, decoder_layers=2,
           train_num_points=128)
NAMES = ["sky", "grass", "water"]


@pytest.fixture
def vision(tiny_clip_dir):
    return CLIPVisionModel.from_pretrained(tiny_clip_dir)


def pixels(b=2, size=30, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def block(model, i):
    return model.encoder.layers[i]


def unit_scores(model):
    """By hand: {(layer, "head"|"neuron", index): L1 / number of weights}, and each unit's size."""
    scores, sizes = {}, {}
    for i in range(LAYERS):
        attn, mlp = block(model, i).self_attn, block(model, i).mlp
        for h in range(HEADS):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            l1 = sum(float(getattr(attn, p).weight.detach()[rows].abs().sum()) for p in ("q_proj", "k_proj", "v_proj"))
            l1 += float(attn.out_proj.weight.detach()[:, rows].abs().sum())
            scores[(i, "head", h)], sizes[(i, "head", h)] = l1 / (4 * HEAD_DIM * HIDDEN), 4 * HEAD_DIM * HIDDEN
        for n in range(NEURONS):
            l1 = float(mlp.fc1.weight.detach()[n].abs().sum() + mlp.fc2.weight.detach()[:, n].abs().sum())
            scores[(i, "neuron", n)], sizes[(i, "neuron", n)] = l1 / (2 * HIDDEN), 2 * HIDDEN
    return scores, sizes


def removed_units(mask):
    out = set()
    for i in range(LAYERS):
        entry = mask.extra["structure"][f"encoder.layers.{i}"]
        out |= {(i, "head", h) for h in range(entry["num_heads"]) if h not in entry["heads"]}
        out |= {(i, "neuron", n) for n in range(entry["intermediate_size"]) if n not in entry["neurons"]}
    return out


# ---- selection ---------------------------------------------------------------------------------------------
def test_structured_global_removes_the_least_important_units_by_l1_per_weight(vision):
    mask = magnitude_prune(vision, 0.4, scope="structured")
    scores, sizes = unit_scores(vision)
    total = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * NEURONS)
    assert mask.num_weights == total and mask.method == "magnitude-structured"
    # the smallest prefix of the ranking that reaches round(0.4 * N) pruned weights
    expected, pruned = set(), 0
    for unit in sorted(scores, key=scores.get):
        if pruned >= round(0.4 * total):
            break
        expected.add(unit)
        pruned += sizes[unit]
    assert removed_units(mask) == expected
    assert 0.4 <= mask.sparsity < 0.4 + max(sizes.values()) / total
    assert mask.sparsity == pytest.approx(pruned / total)  # weights counted as for unstructured masks
    # the binary masks are whole rows (q/k/v, fc1) and columns (out_proj, fc2) of exactly those units
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        for h in range(HEADS):
            gone = (i, "head", h) in expected
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            for part in ("q_proj", "k_proj", "v_proj"):
                assert bool(mask.masks[p + f"self_attn.{part}.weight"][rows].any()) != gone
                assert bool(mask.masks[p + f"self_attn.{part}.weight"][rows].all()) != gone
            assert bool(mask.masks[p + "self_attn.out_proj.weight"][:, rows].all()) != gone
        fc1, fc2 = mask.masks[p + "mlp.fc1.weight"], mask.masks[p + "mlp.fc2.weight"]
        assert torch.equal(fc1.all(1), fc2.all(0)) and torch.equal(fc1.any(1), fc1.all(1))
    assert mask.extra["max_layer_sparsity"] == 0.99 and "L1" in mask.extra["importance"]


def test_structured_layerwise_removes_the_same_fraction_of_every_layer(vision):
    mask = magnitude_prune(vision, 0.5, scope="structured-layerwise")
    scores, _ = unit_scores(vision)
    gone = removed_units(mask)
    for i in range(LAYERS):
        for kind, count in (("head", HEADS), ("neuron", NEURONS)):
            units = sorted((u for u in scores if u[:2] == (i, kind)), key=scores.get)
            assert {u for u in gone if u[:2] == (i, kind)} == set(units[: round(0.5 * count)]), (i, kind)


def test_structured_rounds_are_nested_and_a_masked_model_prunes_among_survivors(vision):
    first = magnitude_prune(vision, 0.3, scope="structured")
    first.apply(vision)
    second = magnitude_prune(vision, 0.6, scope="structured")
    assert removed_units(first) < removed_units(second)
    for n, m in first.masks.items():
        assert not (second.masks[n] & ~m).any(), n
    assert second.sparsity >= 0.6


def test_structured_scope_needs_whole_units(vision):
    with pytest.raises(ValueError, match=r"targeted without \['k_proj', 'v_proj', 'out_proj'\]"):
        magnitude_prune(vision, 0.5, scope="structured", target_modules=r".*q_proj")
    with pytest.raises(ValueError, match="patch_embedding.*is neither"):
        magnitude_prune(vision, 0.5, scope="structured", target_modules=r".*(patch_embedding|fc1|fc2)")
    only_mlp = magnitude_prune(vision, 0.5, scope="structured", target_modules=r".*mlp\.fc[12]")
    assert set(only_mlp.extra["structure"]["encoder.layers.0"]) == {"neurons", "intermediate_size"}


# ---- the cap: layer collapse ------------------------------------------------------------------------------
def test_global_pruning_of_a_random_clip_collapses_layers_unless_capped():
    model = build_random_clip_vision("small")  # q/k/v/fc2 start smaller than out_proj/fc1 (CLIP's init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cap does not bind at 1.0
        free = magnitude_prune(model, 0.98, max_layer_sparsity=1.0)
    collapsed = {n.split(".")[-2] for n, s in free.layer_sparsity().items() if s == 1.0}
    assert {"q_proj", "k_proj", "v_proj", "fc2"} <= collapsed  # whole layers pruned away
    with pytest.warns(UserWarning, match=r"max_layer_sparsity=0.99 bound: \d+ layer\(s\).*encoder\.layers\.0\."):
        capped = magnitude_prune(model, 0.98)
    assert max(capped.layer_sparsity().values()) <= 0.99
    assert capped.sparsity == pytest.approx(0.98, abs=1 / capped.num_weights)  # met by pruning elsewhere
    assert {n: m.sum() for n, m in capped.masks.items()} != {n: m.sum() for n, m in free.masks.items()}
    # the cap below 1 that does not bind changes nothing (global_unstructured's choice, tested elsewhere)
    assert magnitude_prune(model, 0.5) == magnitude_prune(model, 0.5, max_layer_sparsity=1.0)
    with pytest.raises(ValueError, match="max_layer_sparsity must be in"):
        magnitude_prune(model, 0.5, max_layer_sparsity=0.0)
    with pytest.raises(ValueError, match="cannot be reached"):
        magnitude_prune(model, 0.995, max_layer_sparsity=0.99)


def test_structured_cap_keeps_a_head_and_a_neuron_per_layer(vision):
    with pytest.warns(UserWarning, match=r"encoder\.layers\.\d \((heads|neurons)\)"):
        capped = magnitude_prune(vision, 0.7, scope="structured")
    for entry in capped.extra["structure"].values():
        assert len(entry["heads"]) >= 1 and len(entry["neurons"]) >= 1
    assert capped.sparsity >= 0.7
    free = magnitude_prune(vision, 0.7, scope="structured", max_layer_sparsity=1.0)
    assert any(not e["heads"] for e in free.extra["structure"].values())  # a layer with no attention left
    # 4 heads a layer: the cap keeps 1, so at most (3/4 of attention + 36/37 of the MLP) can go
    with pytest.raises(ValueError, match="cannot be reached by removing whole heads and neurons"):
        magnitude_prune(vision, 0.9, scope="structured")


# ---- compaction -------------------------------------------------------------------------------------------
def assert_same(a, b):
    scale = float(a.abs().max())
    assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-4 * scale, float((a - b).abs().max())


def check_shrunk(tower, structure):
    for prefix, entry in structure.items():
        layer = tower.get_submodule(prefix)
        if entry["heads"]:
            attn = layer.self_attn
            assert attn.num_heads == len(entry["heads"])
            assert attn.q_proj.weight.shape == (len(entry["heads"]) * HEAD_DIM, HIDDEN)
            assert attn.out_proj.weight.shape == (HIDDEN, len(entry["heads"]) * HEAD_DIM)
        else:
            assert isinstance(layer.self_attn, RemovedAttention)
        if entry["neurons"]:
            assert layer.mlp.fc1.weight.shape == (len(entry["neurons"]), HIDDEN)
            assert layer.mlp.fc1.bias.shape == (len(entry["neurons"]),)
            assert layer.mlp.fc2.weight.shape == (HIDDEN, len(entry["neurons"]))
        else:
            assert isinstance(layer.mlp, RemovedMLP)


def test_compacted_vision_model_and_clip_model_compute_what_the_masked_ones_do(tiny_clip_dir, vision):
    mask = magnitude_prune(vision, 0.5, scope="structured")
    x = pixels()
    dense = copy.deepcopy(vision)
    mask.apply(dense)
    small = mask.compact(copy.deepcopy(vision))
    assert small.config.compact_structure == mask.extra["structure"]
    check_shrunk(small, mask.extra["structure"])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in vision.parameters())
    assert not any(hasattr(m, "_sparse_mask_hooks") for m in small.modules())  # baked: no hooks
    with torch.no_grad():
        a, b = dense(pixel_values=x), small(pixel_values=x)
    assert_same(a.last_hidden_state, b.last_hidden_state)
    assert_same(a.pooler_output, b.pooler_output)

    clip = CLIPModel.from_pretrained(tiny_clip_dir)  # the same mask, another host (vision_model. prefix)
    dense_clip = copy.deepcopy(clip)
    mask.apply(dense_clip)
    mask.compact(clip)
    check_shrunk(clip.vision_model, mask.extra["structure"])
    with torch.no_grad():
        assert_same(dense_clip.get_image_features(pixel_values=x).pooler_output,
                    clip.get_image_features(pixel_values=x).pooler_output)


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_compacted_framework_matches_and_round_trips(name, tiny_clip_dir, vision, tmp_path):
    mask = magnitude_prune(vision, 0.5, scope="structured")  # made on CLIPVisionModel, applied unchanged
    kw = OVERRIDES.get(name, M2F)
    model = FRAMEWORKS[name].from_clip(tiny_clip_dir, **kw).eval()
    dense = copy.deepcopy(model)
    mask.apply(dense)
    mask.compact(model)
    assert model.config.compact_structure == mask.extra["structure"]
    check_shrunk(model.clip.vision_model, mask.extra["structure"])
    x = pixels()
    with torch.no_grad():
        ref = dense(pixel_values=x, class_names=NAMES).logits
        out = model(pixel_values=x, class_names=NAMES).logits
    assert_same(ref, out)
    model.save_pretrained(tmp_path / "m")
    loaded = FRAMEWORKS[name].from_pretrained(tmp_path / "m").eval()
    assert loaded.config.compact_structure == mask.extra["structure"]
    check_shrunk(loaded.clip.vision_model, mask.extra["structure"])
    with torch.no_grad():
        assert_same(ref, loaded(pixel_values=x, class_names=NAMES).logits)


def test_unstructured_mask_compacts_only_whole_units_folding_constant_ones(vision):
    mask = magnitude_prune(vision, 0.5)  # unstructured: prunes no unit whole ...
    masks = {n: m.clone() for n, m in mask.masks.items()}
    p0, p1 = "encoder.layers.0.", "encoder.layers.1."
    masks[p0 + "self_attn.v_proj.weight"][HEAD_DIM : 2 * HEAD_DIM] = False  # ... but head 1's values (folded)
    masks[p1 + "self_attn.out_proj.weight"][:, 3 * HEAD_DIM :] = False  # head 3 reaches nothing
    masks[p0 + "mlp.fc1.weight"][5] = False  # neuron 5: a constant act(bias) (folded)
    masks[p1 + "mlp.fc2.weight"][:, 7] = False  # neuron 7 reaches nothing
    masks[p0 + "self_attn.q_proj.weight"][:HEAD_DIM] = False  # q/k alone: the head still has an output
    mask = SparseMask(masks)
    dense = copy.deepcopy(vision)
    mask.apply(dense)
    small = mask.compact(copy.deepcopy(vision))
    kept = lambda n, drop: [i for i in range(n) if i != drop]  # noqa: E731
    assert small.config.compact_structure == {
        "encoder.layers.0": {"heads": kept(HEADS, 1), "num_heads": HEADS, "neurons": kept(NEURONS, 5),
                             "intermediate_size": NEURONS},
        "encoder.layers.1": {"heads": kept(HEADS, 3), "num_heads": HEADS, "neurons": kept(NEURONS, 7),
                             "intermediate_size": NEURONS}}
    # the rest of the unstructured mask stays as zeros in the compacted weights
    q = small.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(q == 0, ~masks[p0 + "self_attn.q_proj.weight"][torch.arange(32) // HEAD_DIM != 1])
    x = pixels()
    with torch.no_grad():
        assert_same(dense(pixel_values=x).last_hidden_state, small(pixel_values=x).last_hidden_state)


def test_layers_with_every_head_or_neuron_removed(vision):
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in vision.named_parameters()
             if n.startswith("encoder.layers.") and n.endswith("weight") and "layer_norm" not in n}
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        masks[f"encoder.layers.0.self_attn.{part}.weight"][:] = False
    masks["encoder.layers.1.mlp.fc1.weight"][:] = False
    masks["encoder.layers.1.mlp.fc2.weight"][:] = False
    mask = SparseMask(masks)
    dense = copy.deepcopy(vision)
    mask.apply(dense)
    small = mask.compact(copy.deepcopy(vision))
    assert isinstance(small.encoder.layers[0].self_attn, RemovedAttention)
    assert isinstance(small.encoder.layers[1].mlp, RemovedMLP)
    x = pixels()
    with torch.no_grad():
        assert_same(dense(pixel_values=x).last_hidden_state, small(pixel_values=x).last_hidden_state)
    # what the structured scope does without the cap, and a framework built from that structure loads it
    assert small.config.compact_structure["encoder.layers.0"]["heads"] == []


def test_framework_with_a_removed_attention_round_trips(tiny_clip_dir, vision, tmp_path):
    mask = magnitude_prune(vision, 0.7, scope="structured", max_layer_sparsity=1.0)  # no cap: a layer loses every head
    assert any(not e["heads"] for e in mask.extra["structure"].values())
    model = FRAMEWORKS["deeplabv3"].from_clip(tiny_clip_dir, aspp_channels=16).eval()
    dense = copy.deepcopy(model)
    mask.apply(dense)
    mask.compact(model)
    model.save_pretrained(tmp_path / "m")
    loaded = FRAMEWORKS["deeplabv3"].from_pretrained(tmp_path / "m").eval()
    x = pixels()
    with torch.no_grad():
        assert_same(dense(pixel_values=x, class_names=NAMES).logits, loaded(pixel_values=x, class_names=NAMES).logits)


def test_compact_without_baking_keeps_the_sliced_mask(vision):
    mask = magnitude_prune(vision, 0.5)
    masks = {n: m.clone() for n, m in mask.masks.items()}
    masks["encoder.layers.0.mlp.fc2.weight"][:, :10] = False
    small = SparseMask(masks).compact(copy.deepcopy(vision), bake=False)
    now = SparseMask.from_model(small)
    assert now.masks["encoder.layers.0.mlp.fc1.weight"].shape == (NEURONS - 10, HIDDEN)
    assert torch.equal(now.masks["encoder.layers.0.mlp.fc1.weight"], masks["encoder.layers.0.mlp.fc1.weight"][10:])
    # training keeps the remaining pruned weights at zero
    opt = torch.optim.SGD(small.parameters(), lr=0.5)
    small(pixel_values=pixels()).last_hidden_state.square().mean().backward()
    opt.step()
    small(pixel_values=pixels())
    fc1 = small.encoder.layers[0].mlp.fc1.weight
    assert bool((fc1[~now.masks["encoder.layers.0.mlp.fc1.weight"]] == 0).all())


# ---- adapter files, summary -------------------------------------------------------------------------------
def test_structure_is_saved_loaded_and_validated(vision, tmp_path):
    mask = magnitude_prune(vision, 0.5, scope="structured")
    mask.save_pretrained(tmp_path / "m")
    loaded = SparseMask.from_pretrained(tmp_path / "m")
    assert loaded == mask and loaded.extra["structure"] == mask.extra["structure"]
    cfg_path = tmp_path / "m" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for edit, message in (
        (lambda e: e.update(heads=e["heads"][::-1]), r"\['encoder.layers.0'\] field 'heads' must be sorted and unique"),
        (lambda e: e.update(neurons=[0, 0]), r"field 'neurons' must be sorted and unique"),
        (lambda e: e.update(heads=[0, 9]), r"field 'heads': indices \[9\] out of range \[0, 4\)"),
        (lambda e: e.pop("num_heads"), r"has field 'heads' but not 'num_heads'"),
        (lambda e: e.update(intermediate_size=0), r"field 'intermediate_size' must be a positive integer"),
    ):
        bad = copy.deepcopy(cfg)
        edit(bad["extra"]["structure"]["encoder.layers.0"])
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"adapter_config.json: field 'extra.structure'" + ".*" + message):
            SparseMask.from_pretrained(tmp_path / "m")


def test_summary_by_layer_kind(vision):
    text = magnitude_prune(vision, 0.5, scope="structured").summary()
    kinds = text.split("by layer kind:\n")[1].splitlines()
    assert [line.split()[0] for line in kinds[:6]] == ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"]
    assert "heads kept" in text and "neurons kept" in text


# ---- IMP and the prune command ----------------------------------------------------------------------------
def test_imp_structured_rounds_nest_and_the_cap_is_in_the_fingerprint(tiny_clip_dir, tmp_path):
    from opentrans_hf.data import SegmentationTransform, embedded_dataset
    from opentrans_hf.data.splits import SegmentationSplit, make_loader

    ds = embedded_dataset("train", num_train=8, image_size=30)
    loader = lambda: make_loader(SegmentationSplit(ds, "image", "label", [], SegmentationTransform(30, train=True)),  # noqa: E731
                                 batch_size=4, shuffle=True)
    cfg = IMPConfig(rate=0.3, num_rounds=2, steps_per_round=1, learning_rate=1e-3, scope="structured",
                    output_dir=str(tmp_path))
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    mask = iterative_magnitude_prune(model, loader(), cfg, progress=False)
    r1, r2 = (SparseMask.from_pretrained(tmp_path / f"round_{r:02d}") for r in (1, 2))
    assert r2 == mask and mask.method == "imp-structured" and mask.extra["round"] == 2
    assert removed_units(r1) < removed_units(r2) and r2.sparsity >= cfg.sparsity_after(2)
    # a structured IMP mask compacts: the fine-tuned student computes the same, smaller
    x = pixels()
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        small = mask.compact(copy.deepcopy(model))
        assert_same(ref, small(pixel_values=x).last_hidden_state)
    more = IMPConfig(**{**cfg.__dict__, "num_rounds": 3, "max_layer_sparsity": 0.5})
    with pytest.raises(ValueError, match="max_layer_sparsity: 0.99 in the saved state, 0.5 now"):
        iterative_magnitude_prune(CLIPVisionModel.from_pretrained(tiny_clip_dir), loader(), more, progress=False)
    with pytest.raises(ValueError, match="max_layer_sparsity must be in"):
        IMPConfig(max_layer_sparsity=1.5)


def test_prune_command_structured(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import ArgumentError, parse_args, prune

    with pytest.raises(ArgumentError, match="max_layer_sparsity"):
        parse_args("prune", ["--max_layer_sparsity", "0"])
    args = parse_args("prune", ["--model_name_or_path", str(tiny_clip_dir), "--scope", "structured",
                                "--max_layer_sparsity", "0.75", "--num_rounds", "1", "--steps_per_round", "1",
                                "--rate", "0.4", "--batch_size", "2", "--embedded_size", "4",
                                "--output_dir", str(tmp_path)])
    result = prune.run(args)
    mask = SparseMask.from_pretrained(tmp_path / "mask")
    assert mask.method == "imp-structured" and mask.extra["max_layer_sparsity"] == 0.75
    assert result["sparsity"] == mask.sparsity >= 0.4 and set(mask.extra["structure"]) == {"encoder.layers.0",
                                                                                         "encoder.layers.1"}


def test_a_tower_with_removed_attention_and_mlp_is_counted():
    """A compacted tower whose attentions lost every head (cap off) is counted like any other: the removed
    modules return new tensors, not views of a bias that requires grad (the FLOP counter traced those)."""
    from opentrans_hf import count_params_and_flops
    from opentrans_hf.embedded.random_clip import build_random_clip_vision

    m = build_random_clip_vision("tiny").eval()
    magnitude_prune(m, 0.9, scope="structured", max_layer_sparsity=1.0).compact(m)
    counts = count_params_and_flops(m)
    assert counts["macs"] > 0
