"""The 0.1 module paths keep working for one version: each warns (FutureWarning) and is the new module itself,
so classes, isinstance checks and monkeypatch targets are the same under both names."""

import importlib
import subprocess
import sys

import pytest

MOVED = {
    "opentrans_hf.io": "opentrans_hf.utils.io",
    "opentrans_hf.hub": "opentrans_hf.utils.hub",
    "opentrans_hf.naming": "opentrans_hf.utils.naming",
    "opentrans_hf.matching": "opentrans_hf.utils.matching",
    "opentrans_hf.fingerprint": "opentrans_hf.utils.fingerprint",
    "opentrans_hf.locking": "opentrans_hf.utils.locking",
    "opentrans_hf.distributed": "opentrans_hf.utils.distributed",
    "opentrans_hf.flops": "opentrans_hf.utils.flops",
    "opentrans_hf.adapters": "opentrans_hf.methods.base",
    "opentrans_hf.random_clip": "opentrans_hf.embedded.random_clip",
    "opentrans_hf.data.synthetic": "opentrans_hf.embedded.dataset",
    "opentrans_hf.pretraining": "opentrans_hf.training.pretraining",
    "opentrans_hf.inference": "opentrans_hf.pipelines.inference",
    "opentrans_hf.benchmarks.registry": "opentrans_hf.data.benchmarks.registry",
    "opentrans_hf.benchmarks.prepare": "opentrans_hf.data.benchmarks.prepare",
    "opentrans_hf.frameworks.backbone": "opentrans_hf.models.backbone",
    "opentrans_hf.frameworks.classifier": "opentrans_hf.models.classifier",
    "opentrans_hf.frameworks.modeling_base": "opentrans_hf.models.modeling_ovs",
    "opentrans_hf.frameworks.zeroshot": "opentrans_hf.models.zeroshot",
    "opentrans_hf.frameworks.deeplabv3": "opentrans_hf.models.deeplabv3.modeling_deeplabv3",
    "opentrans_hf.frameworks.mask2former": "opentrans_hf.models.mask2former.modeling_mask2former",
    "opentrans_hf.frameworks.fcclip": "opentrans_hf.models.fcclip.modeling_fcclip",
    **{f"opentrans_hf.pruning.{m}": f"opentrans_hf.methods.sparse_mask.{m}" for m in
       ("compact", "counting", "export", "imp", "magnitude", "mask", "semistructured", "storage", "structured")},
    **{f"opentrans_hf.tuning.{m}": f"opentrans_hf.methods.spectral_tuning.{m}" for m in
       ("config", "flops", "model", "selection", "training_utils")},
}
PACKAGES = {
    "opentrans_hf.pruning": ("opentrans_hf.methods.sparse_mask", ["SparseMask", "IMPConfig", "magnitude_prune"]),
    "opentrans_hf.tuning": ("opentrans_hf.methods.spectral_tuning", ["SpectralModel", "get_spectral_model"]),
    "opentrans_hf.frameworks": ("opentrans_hf.models", ["CLIPDeepLabV3ForOVS", "FRAMEWORKS", "OVSPreTrainedModel"]),
    "opentrans_hf.benchmarks": ("opentrans_hf.data.benchmarks", ["get_benchmark", "BENCHMARK_NAMES"]),
}


def _fresh_import(name):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_module_path_warns_and_is_the_new_module(old, new):
    with pytest.warns(FutureWarning, match=rf"`{old}` moved to `{new}`"):
        module = _fresh_import(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("old", sorted(PACKAGES))
def test_old_package_path_forwards_its_names(old):
    new, names = PACKAGES[old]
    with pytest.warns(FutureWarning, match=rf"`{old}` moved to `{new}`"):
        package = _fresh_import(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(package, name) is getattr(target, name)
    with pytest.raises(AttributeError, match=f"now '{new}'"):
        package.no_such_name


def test_old_configuration_module_has_every_config():
    import opentrans_hf

    with pytest.warns(FutureWarning):
        old = _fresh_import("opentrans_hf.frameworks.configuration")
    for name in ("OVSConfig", "SolverConfig", "CLIPDeepLabV3Config", "CLIPMask2FormerConfig", "CLIPFCCLIPConfig"):
        assert getattr(old, name) is getattr(opentrans_hf.models, name)


def test_old_paths_in_a_fresh_interpreter_give_the_same_classes():
    code = ("import warnings; warnings.simplefilter('error', FutureWarning)\n"
            "import opentrans_hf\n"  # the new paths never warn
            "warnings.simplefilter('ignore', FutureWarning)\n"
            "from opentrans_hf.pruning.mask import SparseMask as A\n"
            "from opentrans_hf.frameworks import CLIPFCCLIPForOVS as B\n"
            "from opentrans_hf.tuning import SpectralModel as C\n"
            "assert A is opentrans_hf.SparseMask and B is opentrans_hf.CLIPFCCLIPForOVS and C is opentrans_hf.SpectralModel\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
