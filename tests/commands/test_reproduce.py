"""`opentrans-hf reproduce`: both tables end to end on the tiny CLIP (two seeds), the numbers consistent
with each other and with the masks and adapters on disk, the noise statements, and bad arguments."""

import json
from pathlib import Path

import pytest

from opentrans_hf.cli import main
from opentrans_hf.commands import ArgumentError, parse_args

TINY = ["--target_sparsity", "0.2", "--prune_rate", "0.2", "--prune_steps_per_round", "1", "--max_steps", "2",
        "--embedded_size", "8", "--max_eval_examples", "2", "--batch_size", "4"]


@pytest.fixture(scope="module")
def reproduced(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    rc = main(["reproduce", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out),
               "--seeds", "0", "1", "--frameworks", "deeplabv3", *TINY])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_table1_masks_counts_and_seeds(reproduced):
    from opentrans_hf.methods.sparse_mask import SparseMask

    out, res = reproduced
    assert res["settings"]["seeds"] == [0, 1] and res["settings"]["frameworks"] == ["deeplabv3"]
    ours = SparseMask.from_pretrained(out / "prune" / "mask")
    rows = res["table1"]["framework_rows"]["deeplabv3"]
    assert set(rows) == {"dense", "random", "ours"}
    dense = rows["dense"]["mean_std"]
    for name, row in rows.items():
        assert sorted(row["runs"]) == ["0", "1"]  # one training run per seed
        for key in ("mean_iou_seen", "mean_iou_unseen"):
            assert row["mean_std"][key]["n"] == 2 and row["mean_std"][key]["std"] is not None
            assert all(0 <= r[key] <= 1 for r in row["runs"].values())  # fractions in JSON
        for seed, run in row["runs"].items():
            assert (out / "table1" / "deeplabv3" / name / f"seed{seed}" / "metrics.json").is_file()
            assert run["steps"] == 2
    for seed in (0, 1):  # the Random masks: exactly Ours' per-layer sparsity, drawn per seed
        rand = SparseMask.from_pretrained(out / "masks" / f"random-seed{seed}")
        assert rand.layer_sparsity() == ours.layer_sparsity() and rand != ours
        assert rows["random"]["runs"][str(seed)]["same_layer_sparsity_as_ours"] is True
    assert (SparseMask.from_pretrained(out / "masks" / "random-seed0")
            != SparseMask.from_pretrained(out / "masks" / "random-seed1"))
    for name in ("random", "ours"):  # effective counts of the masked encoder are below the dense ones
        agg = rows[name]["mean_std"]
        assert agg["effective_params"]["mean"] < dense["effective_params"]["mean"]
        assert agg["effective_inference_flops"]["mean"] < dense["effective_inference_flops"]["mean"]
        assert rows[name]["runs"]["0"]["sparsity"] == pytest.approx(ours.sparsity)
    assert dense["effective_params"]["mean"] == rows["dense"]["runs"]["0"]["params"]
    assert res["table1"]["pruning"]["sparsity"] == pytest.approx(ours.sparsity)
    # Ours by the default layerwise ranking: every layer pruned alike
    assert res["settings"]["pruning"]["scope"] == "layerwise" and ours.method == "imp-layerwise"
    # the CLIP's own zero-shot beside every row: dense and Ours from the prune job, Random scored per mask
    counts = json.loads((out / "prune" / "counts.json").read_text())["zero_shot"]
    for seed in ("0", "1"):
        assert rows["dense"]["runs"][seed]["clip_zero_shot_unseen"] == counts["dense"]["mean_iou_unseen"]
        assert rows["ours"]["runs"][seed]["clip_zero_shot_seen"] == counts["pruned"]["mean_iou_seen"]
        assert 0 <= rows["random"]["runs"][seed]["clip_zero_shot_seen"] <= 1
    # solvers and steps per framework are recorded
    assert res["settings"]["solvers"]["deeplabv3"]["learning_rate"] == 1e-3
    assert res["settings"]["framework_max_steps"] == {"deeplabv3": 2}
    md = (out / "results.md").read_text()
    assert "the CLIP's own zero-shot seen / unseen (%)" in md


def test_random_rows_zero_shot_is_the_masked_clips(reproduced, tiny_clip_dir):
    """Independently: the tiny CLIP's original weights under Random mask 0, scored training-free."""
    from transformers import AutoTokenizer, CLIPModel

    from opentrans_hf.methods.sparse_mask import SparseMask
    from opentrans_hf.training.pretraining import zero_shot_evaluation

    out, res = reproduced
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    SparseMask.from_pretrained(out / "masks" / "random-seed0").apply(clip)
    zs = zero_shot_evaluation(clip, AutoTokenizer.from_pretrained(tiny_clip_dir), embedded_size=8, seed=0)
    run = res["table1"]["framework_rows"]["deeplabv3"]["random"]["runs"]["0"]
    assert run["clip_zero_shot_seen"] == pytest.approx(zs["dense_mean_iou_seen"])


def test_table2_costs_and_ratios(reproduced):
    from opentrans_hf.methods.spectral_tuning import SpectralTuningConfig

    out, res = reproduced
    t = res["table2"]
    assert t["framework"] == "deeplabv3" and t["spectral_warmup_steps"] == 1
    rows = t["rows"]
    assert list(rows) == ["full", "random", "alpha_star", "alpha"]
    full = rows["full"]["mean_std"]
    assert full["time_ratio_to_full"] == 1.0 and full["flops_ratio_to_full"] == 1.0
    full_run = rows["full"]["runs"]["0"]
    # full fine-tuning trains the whole encoder the heads read, and saves no spectral adapter
    assert full_run["trainable_encoder_params"] == full_run["encoder_params"] > 0
    assert not (Path(full_run["dir"]) / "model" / "spectral_adapter").exists()
    # trained once: table 1's dense DeepLabV3 run is table 2's full fine-tuning
    assert t["full_is_table1_dense"] and not (out / "table2" / "full").exists()
    dense = res["table1"]["framework_rows"]["deeplabv3"]["dense"]["runs"]
    assert all(rows["full"]["runs"][s]["dir"] == dense[s]["dir"] for s in ("0", "1"))
    for name in ("random", "alpha_star", "alpha"):
        row = rows[name]
        assert sorted(row["runs"]) == ["0", "1"] and row["mean_std"]["mean_iou_unseen"]["n"] == 2
        for seed, run in row["runs"].items():
            assert run["frozen_encoder_layers"] > 0
            assert run["trainable_encoder_params"] < full_run["trainable_encoder_params"]
            assert run["training_flops"] < rows["full"]["runs"][seed]["training_flops"]
            cfg = SpectralTuningConfig.from_pretrained(out / "table2" / name / f"seed{seed}" / "model" / "spectral_adapter")
            assert cfg.freeze_rule == ("random" if name == "random" else "median")
        assert row["mean_std"]["time_ratio_to_full"] == pytest.approx(
            row["mean_std"]["seconds_per_step"]["mean"] / full["seconds_per_step"]["mean"])
    alpha = rows["alpha"]["runs"]["0"]  # the warm-up step counts at the full fine-tuning rate
    assert alpha["training_flops"] == alpha["warmup_flops_per_step"] + alpha["training_flops_per_step"]
    assert alpha["warmup_flops_per_step"] == full_run["training_flops_per_step"]


def test_noise_statements_and_outputs(reproduced):
    out, res = reproduced
    md = (out / "results.md").read_text()
    assert md.count("| deeplabv3 |") == 3 and "## Table 1" in md and "## Table 2" in md
    assert res["command"] in md and res["command"].startswith("opentrans-hf reproduce ")
    comparisons = res["table1"]["noise"] + res["table2"]["noise"]
    assert [c["comparison"] for c in comparisons] == [
        "deeplabv3: Ours vs Random mask", "Random freezing vs full fine-tuning",
        "alpha* (median, starting weights) vs full fine-tuning", "alpha (median, after warm-up) vs full fine-tuning"]
    for c in comparisons:
        assert c["statement"] in md
        for key in ("mean_iou_unseen", "mean_iou_seen"):
            assert c[key]["verdict"] in ("within noise", "beyond noise")
            assert c[key]["threshold"] >= 0
    # percent with two decimals in the markdown, fractions in the JSON
    ours = res["table1"]["framework_rows"]["deeplabv3"]["ours"]["mean_std"]["mean_iou_seen"]
    assert f"{100 * ours['mean']:.2f} ± {100 * ours['std']:.2f}" in md
    pytest.importorskip("matplotlib")
    assert (out / "mIoU_vs_flops.png").stat().st_size > 0


def test_one_seed_cannot_tell_noise_from_difference():
    from opentrans_hf.commands.reproduce import _compare

    def row(seen, unseen):
        return {"mean_std": {"mean_iou_seen": {"mean": seen, "std": None, "n": 1},
                             "mean_iou_unseen": {"mean": unseen, "std": None, "n": 1}}}

    c = _compare("x vs y", row(0.5, 0.2), row(0.4, 0.1), "x", "y")
    assert c["mean_iou_unseen"]["verdict"] == "cannot tell"
    assert c["statement"].count("1 seed: cannot tell noise from difference") == 2
    assert "+10.00 points" in c["statement"]


def test_quick_takes_the_first_seed_and_fewer_steps():
    from opentrans_hf.commands.reproduce import (
        FULL_MAX_STEPS,
        QUICK_MAX_STEPS,
        resolved_max_steps,
        resolved_seeds,
        resolved_warmup_steps,
    )

    args = parse_args("reproduce", ["--quick", "--seeds", "3", "4"])
    assert resolved_seeds(args) == [3] and resolved_max_steps(args) == QUICK_MAX_STEPS < FULL_MAX_STEPS
    assert 1 <= resolved_warmup_steps(args) < QUICK_MAX_STEPS
    args = parse_args("reproduce", ["--quick", "--max_steps", "7"])
    assert resolved_max_steps(args) == 7
    assert resolved_seeds(parse_args("reproduce", [])) == [0, 1, 2]


@pytest.mark.parametrize("argv, needle", [
    (["--frameworks", "segformer"], "segformer"),
    (["--frameworks", "fcclip", "fcclip"], "--frameworks"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--tables", "3"], "--tables"),
    (["--max_steps", "0"], "--max_steps"),
    (["--max_steps", "5", "--spectral_warmup_steps", "5"], "--spectral_warmup_steps"),
    (["--target_sparsity", "1.5"], "--target_sparsity"),
    (["--model_name_or_path", "./no/such/clip"], "no/such/clip"),
    (["--seeds"], "--seeds"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    assert main(["reproduce", "--output_dir", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_no_seeds_from_python():
    from opentrans_hf.commands.reproduce import ReproduceArguments

    with pytest.raises(ArgumentError, match="--seeds must name at least one seed"):
        ReproduceArguments(seeds=[])
    with pytest.raises(ArgumentError, match="--frameworks must name at least one"):
        ReproduceArguments(frameworks=[])


@pytest.mark.slow
def test_quick_with_the_real_defaults(tmp_path):
    """`reproduce --quick` as a user runs it (default CLIP, all three frameworks, both tables; one seed):
    about 3 minutes on 2 CPU cores."""
    from opentrans_hf.commands.reproduce import QUICK_MAX_STEPS

    out = tmp_path / "quick"
    assert main(["reproduce", "--quick", "--output_dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == f"opentrans-hf reproduce --output_dir {out} --quick"
    assert res["settings"]["seeds"] == [0] and res["settings"]["max_steps"] == QUICK_MAX_STEPS
    assert list(res["table1"]["framework_rows"]) == ["deeplabv3", "mask2former", "fcclip"]
    assert res["table1"]["pruning"]["sparsity"] >= 0.9 and (out / "prune_quick" / "mask").is_dir()
    for rows in res["table1"]["framework_rows"].values():
        assert all(len(r["runs"]) == 1 for r in rows.values())
    assert list(res["table2"]["rows"]) == ["full", "random", "alpha_star", "alpha"]
    md = (out / "results.md").read_text()
    assert md.count("1 seed: cannot tell noise from difference") == 2 * (3 + 3)  # seen + unseen per comparison
