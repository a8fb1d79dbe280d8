"""The package's metadata: what a base install (`pip install opentrans-hf`, no extras) carries is what the base
features import; the lower bounds in pyproject.toml are the versions `make test-lowest` tests
(constraints/lowest.txt); the wheel ships py.typed and builds without setuptools' warnings."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from opentrans_hf.models import CLIPDeepLabV3ForOVS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
BASE = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
LOWEST = ROOT / "constraints" / "lowest.txt"
UNTESTED_LOWER_BOUNDS = {"torch"}  # the tests run with the one CPU wheel of torch the project is developed with


def lowest_pins() -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of constraints/lowest.txt."""
    pins = {}
    for number, line in enumerate(LOWEST.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{LOWEST}:{number}: {line!r} is not a name==version pin"
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def lower_bound(req: Requirement) -> str:
    bounds = [s.version for s in req.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"pyproject.toml: {req} needs exactly one lower bound (>=)"
    return bounds[0]


def test_lower_bounds_are_the_versions_make_test_lowest_installs():
    pins = lowest_pins()
    for req in BASE:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but has no pin in {LOWEST}"
        assert req.specifier.contains(pins[name]), f"{LOWEST} pins {name}=={pins[name]}, outside {req}"
        if name not in UNTESTED_LOWER_BOUNDS:
            assert lower_bound(req) == pins[name], f"pyproject.toml asks for {req}, {LOWEST} tests {pins[name]}"
    # the other pins are packages the direct ones pull in, not forgotten direct dependencies
    assert not {canonicalize_name(r.name) for r in BASE} - pins.keys()


def test_major_versions_that_break_apis_are_excluded():
    upper = {canonicalize_name(r.name): r.specifier for r in BASE}
    assert not upper["transformers"].contains("6.0.0") and upper["transformers"].contains("5.25.0")
    for name in ("torch", "accelerate", "datasets", "huggingface-hub", "numpy"):
        assert any(s.operator == "<" for s in upper[name]), name


def _closure(requirements) -> set[str]:
    """The canonical names of ``requirements`` and, recursively, of what their installed distributions require
    without extras (markers evaluated for this interpreter)."""
    seen, todo = set(), list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return seen


# Run in a fresh interpreter: what the CLI's `opentrans-hf predict` (opentrans_hf.cli:main) and a model load
# through the Auto classes import: {top-level module: its file}, less what the interpreter had at start.
_PREDICT_AND_LIST_MODULES = """
import json, sys
at_start = set(sys.modules)
import transformers
import opentrans_hf
from opentrans_hf.cli import main
model_dir, image, out, listing = sys.argv[1:5]
transformers.AutoModel.from_pretrained(model_dir)
code = main(["predict", "--model", model_dir, "--classes", "sky,road|street,car", "--output_dir", out, image])
used = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
        if "." not in name and name not in at_start}
open(listing, "w").write(json.dumps({"code": code, "modules": used}))
"""


def _installed_files() -> dict[str, str]:
    """Every file an installed distribution records (its RECORD, paths relative to site-packages) -> the
    distribution's canonical name."""
    owners = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        owners.update((f.as_posix(), name) for f in dist.files or [])
    return owners


def test_base_install_carries_what_predict_and_a_model_load_import(tiny_clip_dir, tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16).save_pretrained(model_dir)
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    listing = tmp_path / "modules.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", _PREDICT_AND_LIST_MODULES, str(model_dir), str(image),
                          str(tmp_path / "out"), str(listing)], check=False, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(listing.read_text())
    assert result["code"] == 0 and (tmp_path / "out" / "areas.json").is_file()

    allowed = _closure(BASE)
    assert {"pillow", "transformers", "torch"} <= allowed
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    owners = _installed_files()
    checked, outside = set(), {}
    for module, file in result["modules"].items():
        if module in sys.stdlib_module_names or module == "opentrans_hf" or file is None:
            continue  # the standard library, this package, modules made at run time (no file)
        path = Path(file).resolve()
        where = next((d for d in site if path.is_relative_to(d)), None)
        if where is None:
            continue  # not from an installed distribution (the interpreter's own files)
        owner = owners.get(path.relative_to(where).as_posix())
        checked.add(module)
        if owner not in allowed:
            outside[module] = owner or f"{path}, recorded by no installed distribution"
    assert {"PIL", "transformers", "torch", "safetensors"} <= checked  # the listing sees what predict uses
    assert not outside, (f"a base install lacks what predict / a model load imports: {outside}; add the "
                         "distribution to [project] dependencies in pyproject.toml or import it only where needed")


def test_wheel_builds_without_warnings_and_ships_py_typed(tmp_path):
    """The wheel setuptools builds from pyproject.toml (as `pip install .` does): no deprecation warning from the
    build backend (the license is an SPDX expression), py.typed and the data files inside, the base requirements
    in its metadata."""
    build_req = next(Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    try:
        have = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed here: the wheel is built by pip in an isolated environment")
    if not build_req.specifier.contains(have):
        pytest.skip(f"setuptools {have} here; the build needs {build_req} (pip installs it in an isolated build)")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "opentrans_hf", src / "opentrans_hf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = ("import sys, warnings\n"
             "warnings.simplefilter('always')\n"
             "from setuptools import build_meta\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    name = build_meta.build_wheel(sys.argv[1])\n"
             "print(name)\n"
             "for w in caught: print('WARNING', w.category.__name__, str(w.message).splitlines()[0])\n")
    run = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, check=False,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    warned = [line for line in lines if line.startswith("WARNING ")]
    assert not warned and "Warning" not in run.stderr, warned or run.stderr[-4000:]
    wheel = tmp_path / "dist" / next(l for l in lines if l.endswith(".whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"opentrans_hf/py.typed", "opentrans_hf/model_cards/segmentation_model.md",
            "opentrans_hf/training/mean_iou/mean_iou.py"} <= names
    assert "License-Expression: Apache-2.0" in meta
    requires = [Requirement(l.split(":", 1)[1]) for l in meta.splitlines() if l.startswith("Requires-Dist:")]
    base = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert {"pillow", "transformers", "peft", "scipy"} <= base and "matplotlib" not in base
