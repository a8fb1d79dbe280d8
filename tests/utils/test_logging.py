"""The library's logger (opentrans_hf.utils.logging) and what importing the library leaves alone."""

import ast
import json
import logging as std_logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opentrans_hf.cli import main
from opentrans_hf.commands import command_module, parse_args
from opentrans_hf.training.checkpoints import check_fingerprint
from opentrans_hf.training.trainer import build_model
from opentrans_hf.utils import logging

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "opentrans_hf"


def _python(code: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != logging.ENV_VERBOSITY}  # only what `env` says
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=300)


@pytest.fixture
def verbosity():
    """Restores the library's verbosity (and propagation) after a test that changes it."""
    root = std_logging.getLogger(logging.LIBRARY)
    level, propagate = logging.get_verbosity(), root.propagate
    yield
    logging.set_verbosity(level)
    root.propagate = propagate


# --- importing the library --------------------------------------------------------------------------------

IMPORT_PROBE = """
import json, logging, os, sys, warnings
import torch, transformers
from transformers.utils import logging as hf_logging

added = []  # warning filters set by the library's own code (the dependencies set some of their own)
for name in ("filterwarnings", "simplefilter"):
    def spy(*args, _real=getattr(warnings, name), **kwargs):
        added.append(sys._getframe(1).f_globals.get("__name__", "?"))
        return _real(*args, **kwargs)
    setattr(warnings, name, spy)
root = logging.getLogger()
before = {"root_handlers": list(root.handlers), "root_level": root.level, "hf_verbosity": hf_logging.get_verbosity(),
          "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(), "threads": torch.get_num_threads(),
          "environ": dict(os.environ)}

import opentrans_hf
from transformers import AutoConfig

after = {"root_handlers": list(root.handlers), "root_level": root.level, "hf_verbosity": hf_logging.get_verbosity(),
         "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(), "threads": torch.get_num_threads(),
         "environ": dict(os.environ)}
print(json.dumps({
    "heavy": [m for m in ("matplotlib", "datasets", "pandas") if m in sys.modules],
    "filters_by_the_library": [m for m in added if m.split(".")[0] == "opentrans_hf"],
    "changed": sorted(k for k in before if before[k] != after[k]),
    "auto_config": type(AutoConfig.for_model(opentrans_hf.CLIPDeepLabV3Config.model_type)).__name__,
}))
"""


def test_import_pulls_in_no_heavy_optional_module_and_changes_nothing_global():
    res = _python(IMPORT_PROBE)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["heavy"] == []  # neither matplotlib nor datasets nor pandas
    assert found["filters_by_the_library"] == []  # no warnings.filterwarnings / simplefilter at import
    assert found["changed"] == []  # root logger, transformers' verbosity, torch's defaults, the environment
    assert found["auto_config"] == "CLIPDeepLabV3Config"  # the one intended effect: the Auto classes know the frameworks


PLOT_PROBE = """
import sys, warnings
import matplotlib
matplotlib.use("svg")  # the user's choice
import torch
from torch import nn
from opentrans_hf import SparseMask, magnitude_prune
from opentrans_hf.methods.sparse_mask.export import SparseLinear

model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
mask = magnitude_prune(model, 0.9, target_modules=["0", "1"])
mask.plot(sys.argv[1])
assert "matplotlib.pyplot" not in sys.modules, "plotting went through pyplot"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()

filters = list(warnings.filters)
layer = SparseLinear.from_linear(model[0])
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with torch.no_grad():
        layer(torch.randn(3, 16))
        layer(torch.randn(3, 16))
assert warnings.filters == filters
print([str(w.message) for w in seen])
"""


def test_plots_leave_the_backend_and_the_csr_layer_leaves_the_warning_filters_alone(tmp_path):
    pytest.importorskip("matplotlib")
    res = _python(PLOT_PROBE, tmp_path / "mask.png")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mask.png").read_bytes()[:4] == b"\x89PNG"
    assert res.stdout.strip().splitlines()[-1] == "[]"  # PyTorch's "CSR support is in beta" was filtered, scoped


def _calls_of_print(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, where):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            where = node.name
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "print") or (isinstance(f, ast.Attribute) and f.attr == "print"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} (in {where})")
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, "<module>")
    return found


def test_library_code_logs_instead_of_printing():
    """Only the jobs (commands/, cli.py) print; print_trainable_parameters prints as PEFT's does."""
    jobs = {PACKAGE / "commands", PACKAGE / "cli.py"}
    prints = [c for p in sorted(PACKAGE.rglob("*.py")) if not any(p == j or j in p.parents for j in jobs)
              for c in _calls_of_print(p) if "(in print_trainable_parameters)" not in c]
    assert prints == []
    assert _calls_of_print(PACKAGE / "methods" / "spectral_tuning" / "model.py")  # that one still prints


# --- verbosity ---------------------------------------------------------------------------------------------

def test_set_verbosity_decides_what_is_written(capsys, verbosity):
    log = logging.get_logger("opentrans_hf.test_logging")
    logging.set_verbosity_warning()  # the default, as transformers' (see the environment variable's test)
    log.info("step one")
    log.warning("careful")
    assert capsys.readouterr().err == "warning: careful\n"
    logging.set_verbosity_info()
    log.info("step one")
    assert capsys.readouterr().err == "step one\n"
    logging.set_verbosity("error")
    log.warning("careful")
    log.error("broken")
    assert capsys.readouterr().err == "error: broken\n"
    logging.set_verbosity_debug()
    log.debug("detail")
    assert capsys.readouterr().err == "detail\n"
    with pytest.raises(ValueError, match="got 'loud'"):
        logging.set_verbosity("loud")


ENV_PROBE = """
from opentrans_hf.utils import logging
log = logging.get_logger("opentrans_hf.probe")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line")
"""


def test_the_environment_variable_sets_the_verbosity_at_startup():
    res = _python(ENV_PROBE, env={"OPENTRANS_HF_VERBOSITY": "info"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.splitlines() == ["an info line", "warning: a warning line"] and res.stdout == ""


def test_the_environment_variable_names_a_level_and_wins_over_the_jobs_default(monkeypatch, capsys, verbosity):
    monkeypatch.delenv(logging.ENV_VERBOSITY, raising=False)
    assert logging.env_verbosity() is None and logging.job_level() == std_logging.INFO
    monkeypatch.setenv(logging.ENV_VERBOSITY, " ERROR ")
    assert logging.env_verbosity() == std_logging.ERROR and logging.job_level() == std_logging.ERROR
    monkeypatch.setenv(logging.ENV_VERBOSITY, "loud")
    logging.set_verbosity_warning()
    assert logging.env_verbosity() is None and logging.job_level("debug") == std_logging.DEBUG
    assert capsys.readouterr().err.count("OPENTRANS_HF_VERBOSITY='loud' is not one of debug, info, warning") == 2


def test_a_library_warning_reaches_stderr_and_caplog(tmp_path, capsys, caplog, verbosity):
    diffs = check_fingerprint(tmp_path / "step_2", {"fingerprint": {"seed": 0}}, {"seed": 3}, ignore=True)
    assert diffs == ["seed: 0 in the checkpoint, 3 now"]
    err = capsys.readouterr().err
    assert err.startswith(f"warning: resuming {tmp_path / 'step_2'} despite other arguments") and "seed: 0" in err
    (record,) = caplog.records
    assert record.levelno == std_logging.WARNING and record.name == "opentrans_hf.training.checkpoints"
    assert "despite other arguments" in record.getMessage()


def test_records_reach_the_root_logger_only_when_asked(capsys, verbosity):
    class Keep(std_logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep, root = Keep(), std_logging.getLogger()
    root.addHandler(keep)
    try:
        log = logging.get_logger("opentrans_hf.test_logging")
        log.warning("one")  # an application's logging.basicConfig does not print it a second time
        logging.enable_propagation()
        log.warning("two")
        logging.disable_default_handler()  # routed elsewhere only
        log.warning("three")
        logging.enable_default_handler()
        logging.disable_propagation()
        log.warning("four")
    finally:
        root.removeHandler(keep)
    assert keep.messages == ["two", "three"]
    assert capsys.readouterr().err == "warning: one\nwarning: two\nwarning: four\n"


def test_only_the_main_process_writes_unless_all_ranks(monkeypatch, capsys, verbosity):
    log = logging.get_logger("opentrans_hf.test_logging")
    monkeypatch.setenv("RANK", "1")
    log.warning("from rank 1")
    assert capsys.readouterr().err == ""
    log.warning("every rank says this", extra={"all_ranks": True})
    assert capsys.readouterr().err == "warning: every rank says this\n"
    monkeypatch.setenv("RANK", "0")
    log.warning("from rank 0")
    assert capsys.readouterr().err == "warning: from rank 0\n"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_frozen_encoder_warning_is_written_by_the_main_process_only(rank, tiny_clip_dir, tmp_path, monkeypatch,
                                                                       capsys):
    small = "fpn_channels=32,hidden_dim=32,mask_feature_size=32,num_queries=6,dim_feedforward=64,decoder_layers=2"
    args = parse_args("train", ["--framework", "fcclip", "--model_name_or_path", str(tiny_clip_dir), "--output_dir",
                                str(tmp_path / "run"), "--freeze_rule", "median", "--config_overrides", small])
    monkeypatch.setenv("RANK", rank)
    model, _, spectral, _ = build_model(args, str(tiny_clip_dir), 32, ["cat", "dog"])
    assert spectral is not None and not any(p.requires_grad for p in model.base_model.clip.vision_model.parameters())
    err = capsys.readouterr().err
    assert err.count("keeps its CLIP image encoder frozen") == (1 if rank == "0" else 0), err


# --- the jobs ----------------------------------------------------------------------------------------------

def test_the_cli_runs_its_job_at_info_and_restores_the_verbosity(monkeypatch, tiny_clip_dir, capsys, verbosity):
    log = logging.get_logger("opentrans_hf.test_logging")
    seen = []

    def run(args):
        seen.append(logging.get_verbosity())
        log.info("a progress line of the library")

    monkeypatch.setattr(command_module("analyze"), "run", run)
    monkeypatch.delenv("OPENTRANS_HF_VERBOSITY", raising=False)
    logging.set_verbosity_warning()
    assert main(["analyze", str(tiny_clip_dir)]) == 0
    assert seen == [std_logging.INFO] and capsys.readouterr().err == "a progress line of the library\n"
    assert logging.get_verbosity() == std_logging.WARNING  # as before the job
    monkeypatch.setenv("OPENTRANS_HF_VERBOSITY", "warning")  # the user's choice wins
    assert main(["analyze", str(tiny_clip_dir)]) == 0
    assert seen[-1] == std_logging.WARNING and capsys.readouterr().err == ""


@pytest.mark.slow
def test_the_opentrans_hf_command_still_prints_its_progress(tiny_clip_dir, tmp_path):
    out = tmp_path / "report.json"
    res = _python("import sys; from opentrans_hf.cli import main; sys.exit(main())", "analyze", tiny_clip_dir,
                  "--out", out, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "encoder.layers.1.mlp.fc2" in res.stdout and str(out) in res.stdout  # the per-layer table and the report
    assert json.loads(out.read_text())["estimator"] == "opentrans"
