"""analyze_spectra(estimator="ww") against WeightWatcher 0.7.7 itself."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from opentrans_hf import analyze_spectra

ww = pytest.importorskip("weightwatcher")  # a test dependency: pip install .[test]
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def ww_analyze(model):
    df = ww.WeightWatcher(model=model).analyze()
    return {row["longname"]: row for _, row in df.iterrows()}


def assert_matches_ww(model):
    ref = ww_analyze(model)
    report = analyze_spectra(model, estimator="ww")
    ours = {l.name: l for l in report.layers if l.status == "ok"}
    assert set(ours) == set(ref), "different sets of analysed layers"
    for name, row in ref.items():
        l = ours[name]
        assert abs(l.alpha - row["alpha"]) <= 1e-6, (name, l.alpha, row["alpha"])
        assert l.xmin == pytest.approx(row["xmin"], rel=1e-9), name
        assert l.xmax == pytest.approx(row["xmax"], rel=1e-9), name
        assert l.D == pytest.approx(row["D"], abs=1e-9), name
        if row["sigma"] >= 0:  # ww's small-N fallback reports sigma from alpha=0 (negative); ours is (alpha-1)/sqrt(n)
            assert l.sigma == pytest.approx(row["sigma"], abs=1e-9), name
        assert l.num_pl_spikes == row["num_pl_spikes"], name
        assert l.num_evals == row["num_evals"], name
        assert l.lambda_max == pytest.approx(row["lambda_max"], rel=1e-9), name
        assert l.stable_rank == pytest.approx(row["stable_rank"], rel=1e-9), name
        assert l.alpha_weighted == pytest.approx(row["alpha_weighted"], rel=1e-7), name
        assert l.log_alpha_norm == pytest.approx(row["log_alpha_norm"], rel=1e-7), name
        assert l.log_spectral_norm == pytest.approx(row["log_spectral_norm"], rel=1e-9), name
        assert l.warning == (row["warning"] or ""), name
    return report


class Mixed(nn.Module):
    """Random, Student-t heavy-tailed, conv, embedding, small-N and skipped layers."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(64, 128)
        self.wide = nn.Linear(300, 40)
        self.heavy = nn.Linear(200, 150)
        self.conv = nn.Conv2d(16, 32, 3)
        self.conv5 = nn.Conv2d(24, 12, (5, 3))
        self.emb = nn.Embedding(100, 24)
        self.smalln = nn.Linear(10, 12)  # fewer than 20 eigenvalues: WeightWatcher's small-N fit
        self.too_small = nn.Linear(5, 40)  # min(shape) < 8: skipped by both
        self.fallback = nn.Linear(8, 16)  # 7 non-zero eigenvalues: no small-N candidate qualifies
        self.norm = nn.LayerNorm(24)
        with torch.no_grad():
            self.fallback.weight[:, 0] = 0
            self.heavy.weight.copy_(torch.distributions.StudentT(2.0).sample(self.heavy.weight.shape))


def test_matches_weightwatcher_on_mixed_layers():
    torch.manual_seed(1)
    model = Mixed()
    report = assert_matches_ww(model)
    assert report["too_small"].status == "skipped"
    assert "too few eigenvalues" in report["too_small"].warning
    assert report["emb"].kind == "embedding" and report["conv"].kind == "conv2d"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_weightwatcher_on_heavy_tailed_matrices(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 96), nn.Linear(80, 80))
    with torch.no_grad():
        for i, df in enumerate([1.5, 3.0, 5.0]):
            model[i].weight.copy_(torch.distributions.StudentT(df).sample(model[i].weight.shape))
    assert_matches_ww(model)


def test_matches_weightwatcher_on_tiny_clip(tiny_clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    report = assert_matches_ww(model)
    names = {l.name for l in report.layers if l.status == "ok"}
    assert "vision_model.embeddings.patch_embedding" in names
    assert "text_model.embeddings.token_embedding" in names  # Embedding layers are analysed by ww


def test_weights_requires_grad_and_devices_untouched(tiny_vision):
    before = {k: v.clone() for k, v in tiny_vision.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_vision.named_parameters()}
    tiny_vision.encoder.layers[0].mlp.fc1.weight.requires_grad_(False)
    flags["encoder.layers.0.mlp.fc1.weight"] = False
    for est in ("ww", "opentrans"):
        analyze_spectra(tiny_vision, estimator=est, keep_eigenvalues=True)
    for k, v in tiny_vision.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert v.device.type == "cpu" and v.dtype == before[k].dtype
    assert {n: p.requires_grad for n, p in tiny_vision.named_parameters()} == flags
    tiny_vision.encoder.layers[0].mlp.fc1.weight.requires_grad_(True)


def test_float32_precision_close_to_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.Linear(384, 256))
    exact = analyze_spectra(model, estimator="ww").alphas
    fast = analyze_spectra(model, estimator="ww", precision="float32").alphas
    assert set(exact) == set(fast)
    for name in exact:
        assert abs(fast[name] - exact[name]) / exact[name] <= 1e-3, name


def test_batching_budget_does_not_change_results():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(48, 48) for _ in range(5)], nn.Conv2d(8, 16, 3))
    a = analyze_spectra(model, estimator="ww").alphas
    b = analyze_spectra(model, estimator="ww", max_batch_bytes=1).alphas  # one layer per batch
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=0, atol=1e-9)


@pytest.mark.parametrize("estimator", ["ww", "opentrans"])
def test_batched_torch_path_agrees_with_cpu_engine(monkeypatch, estimator):
    """The path accelerators take (same-shape layers batched, eigvalsh in torch) gives the CPU
    engine's alphas; run on CPU here (no GPU in CI)."""
    import opentrans_hf.spectral.analyze as an

    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.dense.weight[0, 0] = float("nan")
    cpu = analyze_spectra(model, estimator=estimator)
    monkeypatch.setattr(an, "CPU_THREAD_ENGINE", False)
    batched = analyze_spectra(model, estimator=estimator, device="cpu", max_batch_bytes=40_000)
    assert [l.status for l in batched.layers] == [l.status for l in cpu.layers]
    assert batched["dense"].status == "invalid"
    assert batched.alphas.keys() == cpu.alphas.keys()
    for name, a in cpu.alphas.items():
        assert abs(batched.alphas[name] - a) <= 1e-6, name
