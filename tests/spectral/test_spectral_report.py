"""Bad input, the report's API (JSON round trip, pandas, plot, summary) and the layer selection."""

import json
import math
from dataclasses import fields

import pytest
import torch
from torch import nn

from opentrans_hf import SpectralReport, analyze_spectra
from opentrans_hf.spectral import LayerSpectrum, TailFit
from opentrans_hf.spectral.estimators import SPECTRUM_STATISTICS, TailStatistics


def model_with_bad_layers():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(32, 48),  # 0 ok
        nn.Linear(32, 48),  # 1 NaN
        nn.Linear(32, 48),  # 2 Inf
        nn.Linear(32, 48),  # 3 all zero
        nn.Linear(32, 48),  # 4 constant
        nn.Linear(32, 48),  # 5 rank 1
        nn.Conv2d(8, 16, 3),  # 6 constant conv
        nn.Linear(32, 32),  # 7 orthogonal: flat spectrum
        nn.Linear(32, 48),  # 8 ok, after all the bad ones
    )
    with torch.no_grad():
        m[1].weight[3, 4] = float("nan")
        m[2].weight[0, 0] = float("inf")
        m[3].weight.zero_()
        m[4].weight.fill_(0.37)
        m[5].weight.copy_(torch.randn(48, 1) @ torch.randn(1, 32))
        m[6].weight.fill_(-1.0)
        m[7].weight.copy_(torch.linalg.qr(torch.randn(32, 32))[0])
    return m


@pytest.mark.parametrize("estimator", ["opentrans", "ww"])
def test_bad_layers_are_reported_not_fitted_and_analysis_continues(estimator):
    m = model_with_bad_layers()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = analyze_spectra(m, estimator=estimator)
    status = {l.name: l.status for l in report.layers}
    assert status["0"] == "ok" and status["8"] == "ok"
    assert status["1"] == status["2"] == "invalid"
    assert "1 NaN" in report["1"].warning and "1 Inf" in report["2"].warning
    for name in ("3", "4", "5", "6", "7"):
        assert status[name] == "degenerate", (name, report[name])
        assert report[name].alpha is None and report[name].warning
    assert "all-zero" in report["3"].warning and "flat spectrum" in report["7"].warning
    assert set(report.alphas) == {"0", "8"}
    assert all(math.isfinite(a) for a in report.alphas.values())
    for k, v in m.state_dict().items():  # the model is unchanged (NaNs compare as NaN)
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(before[k])), k


def test_no_analysable_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no analysable layer in Sequential.*LayerNorm|no analysable layer in Sequential"):
        analyze_spectra(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    with pytest.raises(ValueError, match="target_modules=\\['nothing'\\]"):
        analyze_spectra(nn.Sequential(nn.Linear(16, 16)), target_modules=["nothing"])
    with pytest.raises(ValueError, match="all skipped"):
        analyze_spectra(nn.Sequential(nn.Linear(4, 40)), estimator="ww")


def test_unknown_estimator_and_precision():
    with pytest.raises(ValueError, match=r"unknown estimator 'alphapruning'.*\['opentrans', 'ww'\]"):
        analyze_spectra(nn.Linear(8, 8), estimator="alphapruning")
    with pytest.raises(ValueError, match="unknown precision"):
        analyze_spectra(nn.Linear(8, 8), precision="float16")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        analyze_spectra({"weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="invalid regular expression"):
        analyze_spectra(nn.Linear(8, 8), target_modules="(unclosed")


def test_peft_style_target_and_exclude(tiny_vision):
    all_names = [l.name for l in analyze_spectra(tiny_vision).layers]
    # list: exact names or dotted suffixes
    r = analyze_spectra(tiny_vision, target_modules=["q_proj", "mlp.fc1"])
    assert [l.name for l in r.layers] == [n for n in all_names if n.endswith((".q_proj", ".mlp.fc1"))]
    # string: full-match regex
    r = analyze_spectra(tiny_vision, target_modules=r"encoder\.layers\.1\..*")
    assert r.layers and all(l.name.startswith("encoder.layers.1.") for l in r.layers)
    r = analyze_spectra(tiny_vision, exclude_modules=["patch_embedding", "fc2"])
    assert "embeddings.patch_embedding" not in [l.name for l in r.layers]
    assert not any(l.name.endswith("fc2") for l in r.layers)


def test_regex_must_match_the_whole_name(tiny_vision):
    with pytest.raises(ValueError, match="no analysable layer"):
        analyze_spectra(tiny_vision, target_modules=r"layers\.1")  # a partial match selects nothing


def test_json_round_trip_pandas_and_summary(tmp_path, tiny_vision):
    report = analyze_spectra(tiny_vision, estimator="ww", keep_eigenvalues=True)
    path = report.to_json(tmp_path / "sub" / "report.json", with_eigenvalues=True)
    back = SpectralReport.from_json(path)
    assert back == report
    slim = SpectralReport.from_json(report.to_json(tmp_path / "slim.json"))
    assert slim.alphas == report.alphas and all(l.eigenvalues is None for l in slim.layers)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    df = report.to_pandas()
    assert list(df["name"]) == [l.name for l in report.layers]
    assert df.loc[df["name"] == "encoder.layers.0.mlp.fc1", "alpha"].item() == report.alphas["encoder.layers.0.mlp.fc1"]
    text = report.summary()
    assert "encoder.layers.1.self_attn.q_proj" in text and "median" in text


def test_from_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        SpectralReport.from_json(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a spectral report"):
        SpectralReport.from_json(bad)
    bad.write_text(json.dumps({"estimator": "ww", "layers": [{"name": "a", "kind": "linear", "shape": [2, 2], "status": "great"}]}))
    with pytest.raises(ValueError, match="layer 'a' has status 'great'"):
        SpectralReport.from_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        SpectralReport.from_json(tmp_path / "missing.json")


def test_plot_writes_png_with_and_without_selection(tmp_path, tiny_vision):
    report = analyze_spectra(tiny_vision, keep_eigenvalues=True)
    frozen = [n for n, a in report.alphas.items() if a < 4]
    for p, sel in ((tmp_path / "a.png", None), (tmp_path / "b.png", frozen)):
        report.plot(p, frozen=sel)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    # without eigenvalues: alpha bars only, still a valid PNG
    analyze_spectra(tiny_vision).plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# the keys of a layer entry, in order, as reports have been written since format_version 1
LAYER_KEYS = ["name", "kind", "shape", "num_evals", "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
              "lambda_max", "norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank",
              "status", "warning"]


def test_a_layer_entry_keeps_its_keys_and_order_and_an_old_report_loads(tmp_path):
    """LayerSpectrum shares its statistics with TailFit (TailStatistics); its JSON and pandas columns stay as
    they were, and a report written before that loads and writes back the same."""
    old = {"format_version": 1, "estimator": "opentrans", "model_class": "CLIPVisionModel", "precision": "float64",
           "layers": [dict(zip(LAYER_KEYS, ["encoder.layers.0.mlp.fc1", "linear", [64, 32], 32, 3.25, 0.5, 9.0,
                                            0.07, 0.4, 12, 9.0, 40.0, 0.954, 3.1, 1.7, 4.44, "ok", ""])),
                      {"name": "encoder.layers.0.mlp.fc2", "kind": "linear", "shape": [32, 64], "status": "skipped",
                       "warning": "not a target"}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    report = SpectralReport.from_json(path)
    assert report.alphas == {"encoder.layers.0.mlp.fc1": 3.25}
    assert report["encoder.layers.0.mlp.fc1"].stable_rank == 4.44 and report["encoder.layers.0.mlp.fc1"].shape == (64, 32)
    written = report.to_dict(with_eigenvalues=False)
    assert [list(entry) for entry in written["layers"]] == [LAYER_KEYS, LAYER_KEYS]
    assert written["layers"][0] == {**old["layers"][0], "shape": [64, 32]}
    assert list(report.to_pandas().columns) == LAYER_KEYS


def test_a_layer_reports_the_tail_statistics_only_of_an_ok_fit():
    stats = {"alpha": 3.0, "xmin": 0.5, "xmax": 9.0, "D": 0.1, "sigma": 0.2, "num_pl_spikes": 7, "lambda_max": 9.0,
             "norm": 20.0, "log_spectral_norm": 0.95, "alpha_weighted": 2.9, "log_alpha_norm": 1.5, "stable_rank": 2.2}
    assert TailFit(**stats).statistics() == stats
    degenerate = TailFit(**stats, status="degenerate", reason="flat").statistics()
    assert {k for k, v in degenerate.items() if v is not None} == set(SPECTRUM_STATISTICS)
    assert {k: degenerate[k] for k in SPECTRUM_STATISTICS} == {k: stats[k] for k in SPECTRUM_STATISTICS}
    assert list(degenerate) == [f.name for f in fields(TailStatistics)] == LAYER_KEYS[4:16]
    layer = LayerSpectrum("a", "linear", (3, 4), 3, **degenerate, status="degenerate", warning="flat")
    assert layer.to_dict()["alpha"] is None and layer.to_dict()["norm"] == 20.0
