"""Reports that accept anything (issue 24, class 6): ``SpectralReport.from_json`` checks every field of a report
(typed and in range; an "ok" layer has a finite alpha > 0) and its errors name the file, the layer and the value;
no median or selection over a report ever sees a NaN alpha."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from opentrans_hf.spectral import SpectralReport, analyze_spectra
from opentrans_hf.spectral.report import LayerSpectrum


def fc(name: str = "encoder.layers.0.mlp.fc1", **changes) -> dict:
    """A layer entry as ``to_json`` writes it for an "ok" fit."""
    entry = {"name": name, "kind": "linear", "shape": [64, 32], "num_evals": 32, "alpha": 3.25, "xmin": 0.5,
             "xmax": 9.0, "D": 0.07, "sigma": 0.4, "num_pl_spikes": 12, "lambda_max": 9.0, "norm": 40.0,
             "log_spectral_norm": 0.954, "alpha_weighted": 3.1, "log_alpha_norm": 1.7, "stable_rank": 4.44,
             "status": "ok", "warning": ""}
    entry.update(changes)
    return entry


def write(tmp_path, layers, **top) -> str:
    report = {"format_version": 1, "estimator": "opentrans", "model_class": "CLIPVisionModel",
              "precision": "float64", "layers": layers, **top}
    path = tmp_path / "report.json"
    # allow_nan: a file as an editor or another tool may write it (NaN / Infinity are no JSON, Python reads them)
    path.write_text(json.dumps(report, allow_nan=True))
    return path


def test_nan_alpha_of_an_ok_layer_is_refused_naming_file_layer_and_value(tmp_path):
    path = write(tmp_path, [fc(), fc("encoder.layers.0.mlp.fc2", alpha=float("nan"))])
    with pytest.raises(ValueError) as err:
        SpectralReport.from_json(path)
    text = str(err.value)
    assert str(path) in text and "'encoder.layers.0.mlp.fc2'" in text and "'alpha'" in text and "nan" in text


def test_a_string_alpha_is_refused(tmp_path):
    path = write(tmp_path, [fc(alpha="big")])
    with pytest.raises(ValueError, match=r"report\.json: layer 'encoder\.layers\.0\.mlp\.fc1': 'alpha' must be a "
                                         r"finite number or null, got 'big'"):
        SpectralReport.from_json(path)


@pytest.mark.parametrize(("changes", "message"), [
    ({"alpha": float("inf")}, r"'alpha' must be a finite number or null, got inf"),
    ({"alpha": None}, r"has status 'ok' but alpha None"),
    ({"alpha": -2.0}, r"has status 'ok' but alpha -2\.0: an 'ok' layer needs a finite alpha > 0"),
    ({"alpha": 0}, r"has status 'ok' but alpha 0"),
    ({"alpha": True}, r"'alpha' must be a finite number or null, got True"),
    ({"status": "great"}, r"layer 'encoder\.layers\.0\.mlp\.fc1' has status 'great'; expected one of"),
    ({"status": None}, r"has status None"),
    ({"kind": "lstm"}, r"'kind' must be one of \('linear', 'conv1d', 'conv2d', 'embedding'\), got 'lstm'"),
    ({"shape": ["64", 32]}, r"'shape' must be a list of integers >= 0, got \['64', 32\]"),
    ({"shape": [64.5, 32]}, r"'shape' must be a list of integers >= 0"),
    ({"shape": [-1, 32]}, r"'shape' must be a list of integers >= 0"),
    ({"shape": "64x32"}, r"'shape' must be a list of integers >= 0, got '64x32'"),
    ({"num_evals": -1}, r"'num_evals' must be an integer >= 0, got -1"),
    ({"num_evals": 3.5}, r"'num_evals' must be an integer >= 0"),
    ({"num_pl_spikes": 1.5}, r"'num_pl_spikes' must be an integer >= 0 or null, got 1\.5"),
    ({"D": 2.0}, r"'D' must be a Kolmogorov-Smirnov distance in \[0, 1\] or null, got 2\.0"),
    ({"xmin": -0.5}, r"'xmin' must be a finite number >= 0 or null, got -0\.5"),
    ({"norm": float("nan")}, r"'norm' must be a finite number >= 0 or null, got nan"),
    ({"stable_rank": "4"}, r"'stable_rank' must be a finite number >= 0 or null"),
    ({"log_alpha_norm": float("-inf")}, r"'log_alpha_norm' must be a finite number or null, got -inf"),
    ({"warning": 3}, r"'warning' must be a string, got 3"),
    ({"eigenvalues": "many"}, r"'eigenvalues' must be a list of finite numbers >= 0"),
    ({"eigenvalues": [1.0, float("nan")]}, r"'eigenvalues' must be a list of finite numbers >= 0"),
    ({"name": 5}, r"layer entry has the name 5; expected a non-empty string"),
    ({"name": ""}, r"layer entry has the name ''"),
    ({"colour": "red"}, r"unknown keys \['colour'\]"),
])
def test_every_field_is_typed_and_in_range(tmp_path, changes, message):
    path = write(tmp_path, [fc(**changes)])
    with pytest.raises(ValueError, match=message) as err:
        SpectralReport.from_json(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("top", "message"), [
    ({"estimator": "magic"}, r"estimator 'magic' is not one of \['opentrans', 'ww'\]"),
    ({"precision": "float8"}, r"precision 'float8' is not one of"),
    ({"model_class": 3}, r"model_class must be a string, got 3"),
    ({"format_version": 2}, r"format_version 2 is not one this version of opentrans-hf reads \(1\.\.1\)"),
    ({"format_version": "1"}, r"format_version '1'"),
    ({"layers": {"a": 1}}, r"'layers' must be a list of layer entries, got dict"),
    ({"layers": ["fc1"]}, r"a layer entry must be a JSON object, got 'fc1'"),
    ({"layers": [fc(), fc()]}, r"layer 'encoder\.layers\.0\.mlp\.fc1' is listed twice"),
    ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_the_report_level_fields_are_checked(tmp_path, top, message):
    path = write(tmp_path, **{"layers": [fc()], **top})
    with pytest.raises(ValueError, match=message) as err:
        SpectralReport.from_json(path)
    assert str(path) in str(err.value)


def test_valid_reports_still_load_degenerate_skipped_and_eigenvalues(tmp_path):
    layers = [fc(eigenvalues=[0.0, 0.5, 9.0]),
              fc("encoder.layers.0.mlp.fc2", alpha=None, xmin=None, xmax=None, D=None, sigma=None, num_pl_spikes=None,
                 alpha_weighted=None, log_alpha_norm=None, status="degenerate", warning="flat spectrum"),
              {"name": "embeddings.patch_embedding", "kind": "conv2d", "shape": [8, 3, 4, 4], "status": "skipped",
               "warning": "not a target"},
              fc("encoder.layers.1.mlp.fc1", alpha=float("nan"), status="invalid", warning="NaN weights")]
    layers[3]["alpha"] = None  # json_safe writes a non-finite statistic as null
    report = SpectralReport.from_json(write(tmp_path, layers))
    assert report.alphas == {"encoder.layers.0.mlp.fc1": 3.25}
    assert report["encoder.layers.0.mlp.fc1"].eigenvalues == [0.0, 0.5, 9.0]
    assert report.counts() == {"ok": 1, "skipped": 1, "degenerate": 1, "invalid": 1}


def test_a_written_report_reads_back_equal(tmp_path, tiny_vision):
    report = analyze_spectra(tiny_vision, keep_eigenvalues=True)
    for with_eigenvalues in (False, True):
        back = SpectralReport.from_json(report.to_json(tmp_path / f"r{with_eigenvalues}.json", with_eigenvalues))
        assert back.alphas == report.alphas
    assert back == report


def test_no_median_over_a_report_sees_a_nan(tmp_path, tiny_vision):
    """The median the docs take (``statistics.median(report.alphas.values())``) and the summary's are finite:
    a NaN alpha cannot be "ok", whether read from a file, made in code or set on a layer afterwards."""
    report = analyze_spectra(tiny_vision)
    assert math.isfinite(statistics.median(report.alphas.values()))
    with pytest.raises(ValueError, match=r"layer 'x' has status 'ok' but alpha nan"):
        LayerSpectrum("x", "linear", (2, 2), alpha=float("nan"))
    with pytest.raises(ValueError, match=r"layer 'x' has status 'fine'"):
        LayerSpectrum("x", "linear", (2, 2), alpha=2.0, status="fine")
    assert LayerSpectrum("x", "linear", (2, 2), status="degenerate").alpha is None
    layer = next(l for l in report.layers if l.status == "ok")
    layer.alpha = float("nan")
    with pytest.raises(ValueError, match=rf"layer '{layer.name}' has status 'ok' but alpha nan"):
        report.summary()
    with pytest.raises(ValueError, match="alpha nan"):
        report.alphas  # noqa: B018 - the property is what is tested
