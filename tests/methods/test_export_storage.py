"""Sparse inference kernels (SparseMask.export: CSR, 2:4), 2:4 masks, and compact lossless storage of a
pruned model (values + bit masks)."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel

from opentrans_hf import SparseMask, load_sparse_pretrained, magnitude_prune, save_sparse_pretrained
from opentrans_hf.methods.sparse_mask import export as export_module
from opentrans_hf.methods.sparse_mask.export import SparseLinear
from opentrans_hf.methods.sparse_mask.storage import SPARSE_WEIGHTS, STORAGE_CONFIG, load_sparse_mask
from opentrans_hf.models import FRAMEWORKS

SMALL_M2F = dict(fpn_channels=32, hidden_dim=32, mask_feature_size=32, num_queries=6, dim_feedforward=64,
                 decoder_layers=2, train_num_points=128)
OVERRIDES = {"deeplabv3": dict(aspp_channels=16), "mask2former": SMALL_M2F, "fcclip": SMALL_M2F}
NAMES = ["sky", "grass", "water"]


def pixels(b=2, size=30, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def masked_and_exported(model, mask, **kw):
    ref = copy.deepcopy(model)
    mask.apply(ref)
    out = copy.deepcopy(model)
    report = mask.export(out, "csr", **kw)
    return ref.eval(), out.eval(), report


def assert_close_to_scale(got, ref):
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-5 * scale + 1e-6, float((got - ref).abs().max() / scale)


# ---- CSR export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_csr_export_computes_the_masked_clip_vision_model(tiny_clip_dir, grad_mode):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    mask = magnitude_prune(model, 0.9, scope="layerwise")
    ref, sparse, report = masked_and_exported(model, mask)
    assert set(report.values()) == {"csr"} and len(report) == len(mask.masks)
    fc1 = sparse.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, SparseLinear) and fc1.crow_indices.dtype == torch.int32 and fc1.col_indices.dtype == torch.int32
    keep = mask.masks["encoder.layers.0.mlp.fc1.weight"]
    assert fc1.nnz == int(keep.sum()) and torch.equal(fc1.dense_weight(), ref.encoder.layers[0].mlp.fc1.weight)
    x = pixels()
    with grad_mode():
        a, b = ref(pixel_values=x), sparse(pixel_values=x)
    assert_close_to_scale(b.last_hidden_state, a.last_hidden_state)
    assert_close_to_scale(b.pooler_output, a.pooler_output)
    # training through it is refused, with what to do instead
    with pytest.raises(RuntimeError, match="inference-only.*torch.inference_mode"):
        sparse(pixel_values=x)


def test_csr_export_on_clipmodel_and_min_sparsity(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    mask = magnitude_prune(clip, 0.9, scope="layerwise")
    light = "encoder.layers.1.self_attn.q_proj.weight"  # a layer pruned only 30%: CSR would not pay
    w = clip.vision_model.encoder.layers[1].self_attn.q_proj.weight.detach().abs()
    mask.masks[light] = w > w.flatten().kthvalue(int(0.3 * w.numel())).values
    ref, sparse, report = masked_and_exported(clip, mask)  # default min_sparsity 0.85
    assert report["vision_model.encoder.layers.1.self_attn.q_proj"] == "dense"
    assert isinstance(sparse.vision_model.encoder.layers[1].self_attn.q_proj, nn.Linear)
    assert sum(v == "csr" for v in report.values()) == len(report) - 1
    q = sparse.vision_model.encoder.layers[1].self_attn.q_proj.weight
    assert torch.equal(q == 0, ~mask.masks[light] | (ref.vision_model.encoder.layers[1].self_attn.q_proj.weight == 0))
    x = pixels()
    with torch.inference_mode():
        assert_close_to_scale(sparse.get_image_features(pixel_values=x).pooler_output,
                              ref.get_image_features(pixel_values=x).pooler_output)
    # min_sparsity=0: every masked layer goes CSR; 1: none does
    assert set(mask.export(copy.deepcopy(clip), "csr", min_sparsity=0.0).values()) == {"csr"}
    assert set(mask.export(copy.deepcopy(clip), "csr", min_sparsity=1.0).values()) == {"dense"}
    with pytest.raises(ValueError, match="min_sparsity"):
        mask.export(copy.deepcopy(clip), "csr", min_sparsity=1.5)
    with pytest.raises(ValueError, match="unknown export format"):
        mask.export(copy.deepcopy(clip), "bsr")


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_csr_export_in_every_framework(name, tiny_clip_dir):
    model = FRAMEWORKS[name].from_clip(tiny_clip_dir, **OVERRIDES[name]).eval()
    mask = magnitude_prune(model, 0.9, scope="layerwise")
    ref, sparse, report = masked_and_exported(model, mask)
    assert set(report.values()) == {"csr"}
    x = pixels()
    with torch.inference_mode():
        a = ref(pixel_values=x, class_names=NAMES).logits
        b = sparse(pixel_values=x, class_names=NAMES).logits
    assert_close_to_scale(b, a)
    with torch.no_grad():
        assert torch.equal(torch.stack(sparse.predict(x, NAMES)), torch.stack(ref.predict(x, NAMES)))


def test_sparse_linear_shapes_dtypes_and_errors():
    g = torch.Generator().manual_seed(0)
    for bias, dtype in ((True, torch.float32), (False, torch.float32), (True, torch.float64)):
        lin = nn.Linear(12, 5, bias=bias).to(dtype)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) > 0.7)
        sl = SparseLinear.from_linear(lin)
        sl.chunk_tokens = 5  # inputs of more tokens go through in blocks
        assert sl.nnz == int((lin.weight != 0).sum())
        for shape in ((12,), (3, 12), (2, 4, 12), (2, 1, 3, 12), (5, 12), (3, 7, 12)):
            x = torch.randn(shape, generator=g, dtype=dtype)
            with torch.no_grad():
                got, want = sl(x), lin(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
    # a layer pruned entirely computes its bias
    empty = nn.Linear(6, 3)
    with torch.no_grad():
        out = SparseLinear.from_linear(empty, torch.zeros(3, 6, dtype=torch.bool))(torch.randn(4, 6))
    assert torch.equal(out, empty.bias.detach().expand(4, 3))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(\.\.\., 6\)"), torch.no_grad():
        SparseLinear.from_linear(empty)(torch.randn(2, 5))
    assert "density=" in repr(SparseLinear.from_linear(empty))
    # half-precision weights: CSR on CPU takes float32/float64, the error names the layer
    model = nn.Sequential(nn.Linear(8, 8)).half()
    mask = SparseMask({"0.weight": torch.rand(8, 8, generator=g) > 0.9})
    with pytest.raises(ValueError, match=r"0\.weight is torch\.float16 on cpu"):
        mask.export(model, "csr")


def test_exported_model_moves_and_copies(tiny_vision):
    model = copy.deepcopy(tiny_vision)
    mask = magnitude_prune(model, 0.9)
    mask.export(model, "csr", min_sparsity=0.0)
    twin = copy.deepcopy(model).to(torch.float32)
    x = pixels(1)
    with torch.inference_mode():
        assert torch.equal(twin(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)
    with pytest.raises(ValueError, match="save the masked model before SparseMask.export"):
        save_sparse_pretrained(model, "unused", mask=mask)


# ---- 2:4 -----------------------------------------------------------------------------------------
def four_divisible_vision():
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=8, patch_size=2)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


def test_two_four_masks_keep_the_two_largest_of_every_four():
    model = four_divisible_vision()
    mask = magnitude_prune(model, 0.5, scope="2:4")
    assert mask.method == "magnitude-2:4" and mask.sparsity == 0.5 and len(mask.masks) == 2 * 6
    for name, keep in mask.masks.items():
        groups = keep.reshape(keep.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name  # exactly 2 of every 4, every row
        w = model.get_parameter(name).detach().abs().reshape(keep.shape[0], -1, 4)
        kept_min = torch.where(groups, w, torch.inf).amin(-1)
        pruned_max = torch.where(groups, -torch.inf, w).amax(-1)
        assert bool((kept_min >= pruned_max).all()), name  # the 2 largest magnitudes
    assert magnitude_prune(model, None, scope="2:4") == mask
    with pytest.raises(ValueError, match="sparsity must be 0.5 or None"):
        magnitude_prune(model, 0.7, scope="2:4")
    # an applied mask stays: pruning among survivors keeps at most 2 per group
    first = magnitude_prune(model, 0.9, scope="layerwise")
    first.apply(model)
    again = magnitude_prune(model, 0.5, scope="2:4")
    for name, keep in again.masks.items():
        assert not (keep & ~first.masks[name]).any()
        assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all())


def test_two_four_needs_in_features_divisible_by_four_and_linear_layers(tiny_vision):
    # the tiny CLIP's fc2 has 37 inputs
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.fc2\.weight has 37"):
        magnitude_prune(tiny_vision, 0.5, scope="2:4")
    mask = magnitude_prune(tiny_vision, 0.5, scope="2:4", exclude_modules=["fc2"])
    assert not any("fc2" in n for n in mask.masks)
    with pytest.raises(ValueError, match="patch_embedding is a Conv2d"):
        magnitude_prune(tiny_vision, 0.5, scope="2:4", target_modules=["embeddings.patch_embedding"])


def test_two_four_export_falls_back_on_cpu_with_a_warning():
    model = four_divisible_vision()
    mask = magnitude_prune(model, 0.5, scope="2:4")
    ref = copy.deepcopy(model)
    mask.apply(ref)
    dense = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="2:4 kernels need a CUDA device.*stay dense"):
        report = mask.export(dense, "2:4")
    assert set(report.values()) == {"dense"}
    for name, keep in mask.masks.items():
        assert torch.equal(dense.get_parameter(name) != 0, keep & (ref.get_parameter(name) != 0)), name
    x = pixels(1, 8)
    with torch.no_grad():
        assert torch.equal(dense(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state)
    with pytest.raises(RuntimeError, match="cannot export to 2:4: 2:4 kernels need a CUDA device"):
        mask.export(copy.deepcopy(model), "2:4", fallback=False)
    # a mask that is not 2:4 is an error naming the layer, on every device
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.k_proj\.weight's mask is not 2:4"):
        magnitude_prune(model, 0.5, scope="layerwise").export(copy.deepcopy(model), "2:4")


def test_two_four_export_converts_where_supported(monkeypatch):
    """The CUDA path's wiring, with the conversion faked (no GPU here): each masked Linear's weight becomes
    what to_sparse_semi_structured returns, frozen."""
    model = four_divisible_vision()
    mask = magnitude_prune(model, 0.5, scope="2:4")
    converted = []

    def fake(w):
        converted.append(w.clone())
        return w.clone()

    monkeypatch.setattr(export_module, "semi_structured_unsupported", lambda weight: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake)
    report = mask.export(model, "2:4")
    assert set(report.values()) == {"2:4"} and len(converted) == len(mask.masks)
    for name, keep in mask.masks.items():
        p = model.get_parameter(name)
        assert not p.requires_grad and torch.equal(p != 0, keep & (p != 0)) and not (p[~keep] != 0).any()


# ---- compact storage -----------------------------------------------------------------------------
def pruned(model, sparsity=0.9):
    mask = magnitude_prune(model, sparsity, scope="layerwise")
    mask.apply(model)
    return mask


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_sparse_storage_round_trip_clip_vision_and_clipmodel(tiny_clip_dir, tmp_path):
    for cls in (CLIPVisionModel, CLIPModel):
        model = cls.from_pretrained(tiny_clip_dir)
        mask = pruned(model)
        out = save_sparse_pretrained(model, tmp_path / cls.__name__)
        assert {p.name for p in out.iterdir()} == {"config.json", SPARSE_WEIGHTS, STORAGE_CONFIG}
        loaded = load_sparse_pretrained(cls, out)
        assert type(loaded) is cls and not loaded.training
        assert_same_state(loaded, model)
        x = pixels()
        with torch.no_grad():
            if cls is CLIPVisionModel:
                assert torch.equal(loaded(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)
            else:
                assert torch.equal(loaded.get_image_features(pixel_values=x).pooler_output,
                                   model.get_image_features(pixel_values=x).pooler_output)
        assert load_sparse_mask(out) == mask
    # transformers' own from_pretrained cannot read it (no model.safetensors): it fails, it does not guess
    with pytest.raises(OSError):
        CLIPVisionModel.from_pretrained(tmp_path / "CLIPVisionModel")
    with pytest.raises(ValueError, match="holds a sparse CLIPModel, not a CLIPVisionModel"):
        load_sparse_pretrained(CLIPVisionModel, tmp_path / "CLIPModel")


def test_sparse_storage_keeps_half_precision(tiny_clip_dir, tmp_path):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir).to(torch.bfloat16)
    pruned(model)
    loaded = load_sparse_pretrained(CLIPVisionModel, save_sparse_pretrained(model, tmp_path / "bf16"))
    assert_same_state(loaded, model)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_framework_sparse_storage_round_trip(name, tiny_clip_dir, tmp_path):
    model = FRAMEWORKS[name].from_clip(tiny_clip_dir, **OVERRIDES[name]).eval()
    mask = pruned(model)
    model.save_pretrained(tmp_path / "m", sparse_storage=True)
    assert (tmp_path / "m" / "tokenizer_config.json").is_file() and not (tmp_path / "m" / "model.safetensors").exists()
    loaded = FRAMEWORKS[name].from_pretrained(tmp_path / "m")
    assert loaded.tokenizer is not None
    assert_same_state(loaded, model)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x, class_names=NAMES).logits, model(pixel_values=x, class_names=NAMES).logits)
    assert not any(p.requires_grad for p in loaded.clip.text_model.parameters())  # frozen again
    assert load_sparse_mask(tmp_path / "m") == mask
    with pytest.raises(TypeError, match="takes only sparse_mask= and is_main_process="):
        model.save_pretrained(tmp_path / "m2", sparse_storage=True, safe_serialization=False)


def test_sparse_storage_is_seven_times_smaller_at_90_percent(tmp_path):
    """Per masked float32 weight: 4 bytes x density + 1/8 byte (the bit) = 0.525 bytes at 90% (7.6x)."""
    config = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=4, patch_size=2)
    model = CLIPVisionModel(config)
    mask = pruned(model)
    model.save_pretrained(tmp_path / "dense")
    save_sparse_pretrained(model, tmp_path / "sparse")
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    path = tmp_path / "sparse" / SPARSE_WEIGHTS
    size = path.stat().st_size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    masked = {n for n, _ in mask.resolve(model)[0].items()}
    rest = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in masked)
    expected = sum(4 * int(m.sum()) + (m.numel() + 7) // 8 + 8 * m.dim() for m in mask.masks.values())
    assert size - header - rest == expected  # values + bits + shape, nothing else
    n = mask.num_weights
    assert expected / n == pytest.approx(4 * 0.1 + 1 / 8, abs=1e-3)
    assert 4 * n / expected >= 7.5
    assert dense_size / size >= 6, (dense_size, size)


def corrupt_tensor_byte(path: Path, key: str) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8 : 8 + n])[key]["data_offsets"][0]
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_or_truncated_sparse_file_is_an_error_naming_file_and_tensor(tiny_clip_dir, tmp_path):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    pruned(model)
    out = save_sparse_pretrained(model, tmp_path / "m")
    path = out / SPARSE_WEIGHTS
    good = path.read_bytes()
    key = "encoder.layers.1.mlp.fc1.weight.sparse_values"
    corrupt_tensor_byte(path, key)
    with pytest.raises(ValueError, match=rf"{SPARSE_WEIGHTS}: tensor '{key}' does not match its CRC-32"):
        load_sparse_pretrained(CLIPVisionModel, out)
    path.write_bytes(good[: len(good) - 100])  # truncated: the last tensors' data are missing
    with pytest.raises(ValueError, match=rf"cannot read .*{SPARSE_WEIGHTS}.*tensor\(s\) cut off: '"):
        load_sparse_pretrained(CLIPVisionModel, out)
    path.write_bytes(good[:20])  # even the header is cut off
    with pytest.raises(ValueError, match=r"header is cut off or corrupt"):
        load_sparse_pretrained(CLIPVisionModel, out)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=SPARSE_WEIGHTS):
        load_sparse_pretrained(CLIPVisionModel, out)
    # a manifest that disagrees with the file (kept count), and one that is no manifest
    path.write_bytes(good)
    manifest = json.loads((out / STORAGE_CONFIG).read_text())
    entry = manifest["sparse_tensors"]["encoder.layers.0.self_attn.q_proj.weight"]
    entry["kept"] += 1
    (out / STORAGE_CONFIG).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"tensor 'encoder\.layers\.0\.self_attn\.q_proj\.weight' stores \d+ torch\.float32 values"):
        load_sparse_pretrained(CLIPVisionModel, out)
    (out / STORAGE_CONFIG).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a sparse storage manifest"):
        load_sparse_pretrained(CLIPVisionModel, out)


def test_sparse_save_refusals(tiny_clip_dir, tmp_path):
    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    with pytest.raises(ValueError, match="no mask is applied"):
        save_sparse_pretrained(model, tmp_path / "a")
    mask = magnitude_prune(model, 0.5)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.\S+\.weight has \d+ nonzero weight\(s\) where the mask prunes"):
        save_sparse_pretrained(model, tmp_path / "a", mask=mask)  # given but not applied: not lossless
    mask.apply(model)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a saved model.*refusing to replace it"):
        save_sparse_pretrained(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    # a previous save (dense here) is replaced as a whole: no stale model.safetensors beside the sparse file
    model.save_pretrained(tmp_path / "m")
    save_sparse_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert save_sparse_pretrained(model, tmp_path / "worker", is_main_process=False) is None
    assert not (tmp_path / "worker").exists()


def test_sparse_save_is_atomic(tiny_clip_dir, tmp_path, monkeypatch):

    model = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    pruned(model)
    save_sparse_pretrained(model, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("opentrans_hf.methods.sparse_mask.storage.save_file", half_then_fail)  # where the save calls it
    with pytest.raises(OSError, match="disk full"):
        save_sparse_pretrained(model, tmp_path / "m")
    with pytest.raises(OSError, match="disk full"):
        save_sparse_pretrained(model, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # the old save, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half directory, no leftovers


@pytest.mark.slow
def test_killed_sparse_save_leaves_no_half_directory(tiny_clip_dir, tmp_path):
    """SIGKILL in the middle of writing the weights: the target name never appears."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from transformers import CLIPVisionModel
        import opentrans_hf.methods.sparse_mask.storage as storage
        from opentrans_hf import magnitude_prune, save_sparse_pretrained

        model = CLIPVisionModel.from_pretrained({str(tiny_clip_dir)!r})
        magnitude_prune(model, 0.9).apply(model)
        def write_half_and_die(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        storage.save_file = write_half_and_die  # the writer the save calls
        save_sparse_pretrained(model, {str(tmp_path / "m")!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "m").exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".m.") and n.endswith(".tmp") for n in leftovers), leftovers  # hidden, never "m"


def test_imp_with_the_2_4_scope_is_one_round_at_half(tmp_path, tiny_clip_dir, capsys):
    """IMP with scope 2:4: one round at exactly 50% in the 2-of-4 pattern, then the distillation; other
    round counts or sparsities are refused with the reason; a layer whose width is no multiple of 4 (the
    tiny CLIP's fc2 has 37 inputs) is named by the prune job."""
    from opentrans_hf import IMPConfig, iterative_magnitude_prune
    from opentrans_hf.cli import main as cli_main
    from opentrans_hf.data import SegmentationTransform, embedded_dataset
    from opentrans_hf.data.splits import SegmentationSplit, make_loader
    from opentrans_hf.methods.sparse_mask.semistructured import is_two_four

    assert (IMPConfig(scope="2:4").num_rounds, IMPConfig(scope="2:4").target_sparsity) == (1, 0.5)
    with pytest.raises(ValueError, match="one round at sparsity 0.5"):
        IMPConfig(scope="2:4", target_sparsity=0.9)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = CLIPVisionModel(config)
    split = SegmentationSplit(embedded_dataset("train", num_train=4, image_size=32), "image", "label", [],
                              SegmentationTransform(32, train=True))
    mask = iterative_magnitude_prune(model, make_loader(split, batch_size=2, shuffle=True),
                                     IMPConfig(scope="2:4", steps_per_round=2, output_dir=str(tmp_path / "imp")),
                                     progress=False)
    assert mask.sparsity == pytest.approx(0.5) and all(is_two_four(m) for m in mask.masks.values())
    assert mask.method == "imp-2:4"
    rc = cli_main(["prune", "--model_name_or_path", str(tiny_clip_dir), "--scope", "2:4", "--steps_per_round", "1",
                   "--batch_size", "2", "--embedded_size", "4", "--output_dir", str(tmp_path / "p")])
    assert rc == 1 and "encoder.layers.0.mlp.fc2.weight has 37" in capsys.readouterr().err
