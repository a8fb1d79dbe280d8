"""The typed command layer: one dataclass + run() per job, --help with defaults and choices, snake_case
flags, steps vs epochs, library packages free of CLI code, and errors a person can read."""

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from opentrans_hf.cli import main
from opentrans_hf.commands import COMMANDS, ArgumentError, build_parser, command_module, parse_args

ROOT = Path(__file__).resolve().parents[2]
LIBRARY_PACKAGES = ("spectral", "tuning", "pruning", "frameworks", "data", "training")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_every_field_with_default_and_choices(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser(name).parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    cls = command_module(name).ARGUMENTS
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert f"--{f.name}" in text, f"{name}: --{f.name} missing from --help"
        assert "-" not in f.name.replace("_", ""), f"{name}: flags are snake_case"
        t = hints[f.name]
        literal = next((a for a in (t, *typing.get_args(t)) if typing.get_origin(a) is typing.Literal), None)
        if literal is not None:  # an enumeration: its choices are listed
            assert "{" + ",".join(typing.get_args(literal)) + "}" in text, f"{name}: choices of --{f.name}"
    parser = build_parser(name)
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help",):
            assert "(default: " in parser.formatter_class("x")._get_help_string(action), action.dest


def test_enumerations_are_choices():
    from opentrans_hf.commands import analyze, demo, prune, train

    for cls, fld in ((train.TrainArguments, "framework"), (train.TrainArguments, "freeze_rule"),
                     (train.TrainArguments, "lr_scheduler_type"), (train.TrainArguments, "mixed_precision"),
                     (analyze.AnalyzeArguments, "estimator"), (analyze.AnalyzeArguments, "precision"),
                     (demo.DemoArguments, "framework"), (demo.DemoArguments, "estimator"),
                     (prune.PruneArguments, "scope")):
        t = typing.get_type_hints(cls)[fld]
        assert typing.Literal in (typing.get_origin(t), *map(typing.get_origin, typing.get_args(t))), (cls, fld)


def test_analyze_keeps_positional_model_and_dashed_aliases():
    args = parse_args("analyze", ["tiny", "--target-modules", "fc1,fc2", "--no-progress", "--exclude-modules", "re:x"])
    assert (args.model, args.target_modules, args.no_progress, args.exclude_modules) == ("tiny", "fc1,fc2", True, "re:x")
    args = parse_args("analyze", ["--model", "tiny", "--target_modules", "fc1", "--no_progress"])
    assert (args.model, args.target_modules, args.no_progress) == ("tiny", "fc1", True)


def test_max_steps_defaults_to_minus_one_and_epochs_count(tiny_clip_dir, tmp_path):
    from opentrans_hf.commands import train

    args = parse_args("train", [])
    assert args.max_steps == -1 and args.num_epochs == 3.0
    # 8 training examples, batch 4 -> 2 steps per epoch; --num_epochs 2 -> 4 steps (max_steps not given)
    metrics = train.run(parse_args("train", [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path), "--num_epochs", "2",
        "--batch_size", "4", "--embedded_size", "8", "--max_eval_examples", "2"]))
    assert metrics["steps"] == 4
    # a positive --max_steps overrides the epochs
    assert parse_args("train", ["--num_epochs", "2", "--max_steps", "7"]).max_steps == 7
    with pytest.raises(ArgumentError, match="max_steps > 0 or --num_epochs > 0"):
        parse_args("train", ["--num_epochs", "0"])


@pytest.mark.slow
def test_demo_calls_the_jobs_with_typed_arguments(tiny_clip_dir, tmp_path, monkeypatch):
    """The demo composes analyze/prune/train through their run() with dataclasses: no argv is re-parsed."""
    from transformers import HfArgumentParser

    from opentrans_hf.commands import analyze, demo, prune, train

    args = parse_args("demo", ["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path),
                               "--target_sparsity", "0.2", "--prune_rate", "0.2", "--prune_steps_per_round", "1",
                               "--max_steps", "1", "--embedded_size", "8", "--max_eval_examples", "2",
                               "--batch_size", "4"])
    seen, train_args = [], []
    for module in (analyze, prune, train):
        original = module.run
        monkeypatch.setattr(module, "run", lambda a, _run=original: (seen.append(type(a).__name__), _run(a))[1])
    original_train = train.run
    monkeypatch.setattr(train, "run", lambda a: (train_args.append(a), original_train(a))[1])

    def no_parsing(*a, **k):
        raise AssertionError("the demo must not compose and re-parse argument lists")

    monkeypatch.setattr(HfArgumentParser, "parse_args_into_dataclasses", no_parsing)
    summary = demo.run(args)
    # the run, then its dense baseline: the same fine-tuning without the mask and without freezing
    assert seen == ["AnalyzeArguments", "PruneArguments", "TrainArguments", "TrainArguments"]
    run, dense = train_args
    assert run.mask and run.freeze_rule == "median" and dense.mask is None and dense.freeze_rule is None
    assert (run.max_steps, run.learning_rate, run.seed) == (dense.max_steps, dense.learning_rate, dense.seed)
    assert summary["training"]["steps"] == 1 and summary["spectral"]["layers"] > 0
    rows = summary["comparison"]
    assert list(rows) == ["deeplabv3, pruned + spectrally tuned (this run)", "deeplabv3, dense, fully fine-tuned",
                          "dense CLIP, no training (dense zero-shot)",
                          "pruned CLIP (original weights x mask), no training (dense zero-shot)", "uniformly random labels"]
    assert rows["deeplabv3, pruned + spectrally tuned (this run)"] == summary["eval"]["embedded:validation"]
    assert all(0 <= r["mean_iou_unseen"] <= 1 and 0 <= r["mean_iou_seen"] <= 1 for r in rows.values())


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if base.endswith(".") is False else f"{base}{a.name}" for a in node.names)
    return names


def test_library_packages_hold_no_cli_code_and_import_only_downward():
    pkg = ROOT / "opentrans_hf"
    offenders = []
    for sub in LIBRARY_PACKAGES:
        for path in sorted((pkg / sub).rglob("*.py")):
            for name in _imports(path):
                if name == "argparse" or "commands" in name.split(".") or name.endswith(("cli", ".cli")):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders
    for job in COMMANDS:  # every job is one file: an ARGUMENTS dataclass and run()
        module = command_module(job)
        assert dataclasses.is_dataclass(module.ARGUMENTS) and callable(module.run)
        assert Path(module.__file__).name == f"{job.replace('-', '_')}.py"  # pretrain-clip: pretrain_clip.py


@pytest.mark.slow
def test_scripts_are_thin_shells_over_the_commands():
    for script in ("train", "prune", "evaluate", "demo", "pretrain-clip", "reproduce"):
        text = (ROOT / "scripts" / f"{script.replace('-', '_')}.py").read_text()
        code = [l for l in text.split('"""')[-1].splitlines() if l.strip()]
        assert f'main(["{script}", *sys.argv[1:]])' in text and len(code) <= 5, script
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "prune.py"), "--bogus"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "opentrans-hf prune: error: unrecognized arguments: --bogus (see opentrans-hf prune --help)"]


# ---- errors a person can read -----------------------------------------------------------------


def _err_lines(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if l.strip()]


@pytest.mark.parametrize("argv, expected", [
    (["train", "--framework", "segformer"], "invalid choice: 'segformer'"),
    (["train", "--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["train", "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["train", "--max_steps", "x"], "invalid int value: 'x'"),
    (["evaluate"], "the following arguments are required: --model"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, expected, capsys):
    assert main(argv) == 2
    lines = _err_lines(capsys)
    assert expected in lines[0] and not any("Traceback" in l for l in lines)
    if argv[0] != "frobnicate":
        assert len(lines) == 1, lines


def test_missing_local_paths_fail_at_once_without_the_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("a missing local path must not be looked up on the Hub")

    for fn in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, fn, no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cases = [
        ["train", "--model_name_or_path", "./clip"],                       # relative
        ["train", "--mask", "runs/prune/mask"],                            # more than owner/name
        ["train", "--dataset", "runs/data"],                               # parent exists
        ["prune", "--model_name_or_path", str(tmp_path / "nope")],         # absolute
        ["evaluate", "--model", "runs/model"],
        ["demo", "--dataset", "../nowhere/data"],
        ["analyze", "runs/clip"],                                          # analyze's positional model
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        line = _err_lines(capsys)[-1]
        assert "no such directory" in line and repr(argv[-1]) in line, line
    # a library call does the same check before any Hub lookup
    from opentrans_hf import SparseMask

    with pytest.raises(FileNotFoundError, match="no such directory"):
        SparseMask.from_pretrained("runs/prune/mask")


def test_failed_run_is_one_line_exit_1_and_debug_gives_the_traceback(monkeypatch, capsys):
    from opentrans_hf.commands import analyze

    def broken(*a, **k):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(analyze, "analyze_spectra", broken)
    assert main(["analyze", "tiny", "--no-progress"]) == 1
    lines = _err_lines(capsys)
    assert lines == ["opentrans-hf analyze: error: LinAlgError: Eigenvalues did not converge"]

    monkeypatch.setattr(analyze, "load_model_for_analysis", lambda *a: (_ for _ in ()).throw(TypeError("bad\ntype")))
    assert main(["analyze", "tiny"]) == 1
    assert _err_lines(capsys) == ["opentrans-hf analyze: error: TypeError: bad (more with --debug)"]

    assert main(["--debug", "analyze", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "TypeError: bad" in err
    monkeypatch.setenv("OPENTRANS_HF_DEBUG", "1")
    assert main(["analyze", "tiny"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_exit_codes(tmp_path):
    import os
    import shutil

    exe = shutil.which("opentrans-hf") or os.path.join(os.path.dirname(sys.executable), "opentrans-hf")
    res = subprocess.run([exe, "train", "--mask", str(tmp_path / "no" / "mask")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no such directory" in res.stderr
    res = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "commands:" in res.stdout and "demo" in res.stdout
