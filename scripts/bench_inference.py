"""Benchmark: wall time, memory and file size of pruned CLIP image encoders on CPU (inference).

A random-initialised CLIP ViT-B/16 vision tower (opentrans_hf.embedded.random_clip), 224 px, encoder forward under
``torch.inference_mode()`` at batch 1 and 8, default threads. Variants of the same weights:

* ``dense``: no mask;
* ``hooks90``: a 90% per-layer (``scope="layerwise"``) unstructured mask applied (``SparseMask.apply``:
  zeros + a forward pre-hook per layer);
* ``baked90``: the same weights with the mask removed (``SparseMask.remove(bake=True)``: zeros kept);
* ``csr90``: that mask exported (``mask.export(model, "csr")``: masked Linear -> MKL CSR ``addmm``);
* ``structured50`` / ``structured90``: ``scope="structured"`` masks (whole heads and MLP neurons,
  ranked globally), compacted (``mask.compact(model)``: smaller dense layers). On random weights the
  global ranking takes heads first (their initial weights are smaller): 11 of 12 heads per layer go
  (the ``max_layer_sparsity`` cap keeps one), the rest from the MLPs;
* ``structured_layerwise50``: ``scope="structured-layerwise"`` at 50% (every layer keeps 6 of 12 heads
  and half its MLP neurons), compacted: the same sparsity with another shape.

Then a whole framework forward (DeepLabV3 and FC-CLIP around a random ViT-B/16 ``CLIPModel``, 8 class
names, eval mode): dense vs a structured 50% encoder (compacted) vs the CSR-exported 90% mask.

Timing: warm-up forwards first, then ``--rounds`` interleaved rounds; each round times every variant
once (``--repeats`` forwards, their mean), the order rotating from round to round, so that a slow phase
of the shared machine hits every variant alike. Per variant the median over rounds; speed-ups are
dense median / variant median. Beside each: the FLOP ratio (dense MACs / effective MACs of the vision
tower, ``count_params_and_flops``; attention matmuls included), the bytes of its parameters and buffers
(masks, CSR indices included), and file sizes: the dense tower's ``model.safetensors``, its compact
sparse storage at 90% (``save_sparse_pretrained``: kept values + bit masks), the CSR state dict, the
compacted structured towers.

The last line printed is a JSON object with every measured ratio (keys ``structured50_speedup_b1``,
``csr90_speedup_b1``, ``storage_ratio_90``, ``flops_ratio_structured50``, ...).

Usage: ``python scripts/bench_inference.py [--rounds 5] [--repeats 1] [--skip_frameworks] [--quick]``
(``--quick``: the tiny CLIP, for a test; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

CLASS_NAMES = ["wall", "building", "sky", "floor", "tree", "road", "person", "car"]
BATCHES = (1, 8)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else None
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def time_interleaved(fns: dict, rounds: int, repeats: int, warmup: int, label: str = "") -> dict[str, float]:
    """Median over ``rounds`` of the mean of ``repeats`` calls, per callable; rounds rotate the order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    per_round = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            for _ in range(repeats):
                fns[n]()
            per_round[n].append((time.perf_counter() - t0) / repeats)
        print(f"  {label}round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * per_round[n][-1]:.0f} ms" for n in names),
              flush=True)
    return {n: statistics.median(v) for n, v in per_round.items()}


def tower_variants(size: str, max_layer_sparsity: float = 0.99):
    """{name: model} of the vision tower variants, the 90% layerwise mask, {name: MAC count} and notes."""
    from opentrans_hf import SparseMask, count_params_and_flops, magnitude_prune
    from opentrans_hf.embedded.random_clip import build_random_clip_vision

    # inference only; also, a compacted attention with no head left (RemovedAttention) returns a view of
    # its bias Parameter that FlopCounterMode's module tracker rejects when the bias requires grad
    dense = build_random_clip_vision(size).eval().requires_grad_(False)
    mask90 = magnitude_prune(dense, 0.9, scope="layerwise")
    hooked = copy.deepcopy(dense)
    mask90.apply(hooked)
    baked = copy.deepcopy(hooked)
    SparseMask.remove(baked, bake=True)
    csr = copy.deepcopy(dense)
    report = mask90.export(csr, "csr")
    variants = {"dense": dense, "hooks90": hooked, "baked90": baked, "csr90": csr}
    macs = {"dense": count_params_and_flops(dense)["macs"]}
    for name in ("hooks90", "baked90", "csr90"):
        macs[name] = count_params_and_flops(dense, mask90)["effective_macs"]
    structured = {}
    for name, s, scope in (("structured50", 0.5, "structured"), ("structured90", 0.9, "structured"),
                           ("structured_layerwise50", 0.5, "structured-layerwise")):
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():  # the cap binding on the heads (see the module doc) is expected here
            warnings.filterwarnings("ignore", message="max_layer_sparsity=.* bound", category=UserWarning)
            mask = magnitude_prune(model, s, scope=scope, max_layer_sparsity=max_layer_sparsity)
        mask.compact(model)
        variants[name] = model
        structured[name] = mask
        macs[name] = count_params_and_flops(model)["macs"]  # the compacted model's own (dense) count
    info = {"csr_layers": sum(v == "csr" for v in report.values()), "masked_layers": len(report),
            "mask90_sparsity": mask90.sparsity, "structured": {s: kept_units(m) for s, m in structured.items()}}
    return variants, mask90, macs, info


def kept_units(mask) -> str:
    """'sparsity, heads kept / heads, neurons kept / neurons' of a structured mask."""
    entries = mask.extra["structure"].values()
    kept = [sum(len(e.get(u, [])) for e in entries) for u in ("heads", "neurons")]
    total = [sum(e.get(n, 0) for e in entries) for n in ("num_heads", "intermediate_size")]
    return f"{100 * mask.sparsity:.2f}% ({kept[0]}/{total[0]} heads, {kept[1]}/{total[1]} MLP neurons kept)"


def storage_sizes(variants: dict, mask90) -> dict[str, int]:
    """Bytes on disk: dense safetensors, sparse storage at 90%, the CSR state dict, compacted towers."""
    from safetensors.torch import save_file

    from opentrans_hf import save_sparse_pretrained

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants["dense"].save_pretrained(tmp / "dense")
        sizes["dense"] = (tmp / "dense" / "model.safetensors").stat().st_size
        save_sparse_pretrained(variants["hooks90"], tmp / "sparse90", mask=mask90)
        sizes["sparse_storage90"] = (tmp / "sparse90" / "sparse_model.safetensors").stat().st_size
        state = {k: v.contiguous() for k, v in variants["csr90"].state_dict().items()}
        save_file(state, str(tmp / "csr90.safetensors"))
        sizes["csr90"] = (tmp / "csr90.safetensors").stat().st_size
        for name in ("structured50", "structured90", "structured_layerwise50"):
            variants[name].save_pretrained(tmp / name)
            sizes[name] = (tmp / name / "model.safetensors").stat().st_size
    return sizes


def framework_variants(size: str, tmp: Path):
    """{framework: {variant: model}} for DeepLabV3 and FC-CLIP around one random CLIPModel."""
    from opentrans_hf import magnitude_prune
    from opentrans_hf.embedded.random_clip import make_random_clip
    from opentrans_hf.models import CLIPDeepLabV3ForOVS, CLIPFCCLIPForOVS

    clip = make_random_clip(tmp / "clip", size)
    out, notes = {}, {}
    for key, cls in (("deeplabv3", CLIPDeepLabV3ForOVS), ("fcclip", CLIPFCCLIPForOVS)):
        torch.manual_seed(0)
        dense = cls.from_clip(clip).eval().requires_grad_(False)
        models = {"dense": dense}
        s50 = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="max_layer_sparsity=.* bound", category=UserWarning)
            mask = magnitude_prune(s50, 0.5, scope="structured")
        mask.compact(s50)
        models["structured50"] = s50
        try:
            csr = copy.deepcopy(dense)
            magnitude_prune(csr, 0.9, scope="layerwise").export(csr, "csr")
            models["csr90"] = csr
        except Exception as err:  # noqa: BLE001 - reported, the rest of the benchmark goes on
            notes[key] = f"csr90 export failed: {type(err).__name__}: {err}"
        out[key] = models
    return out, notes


def framework_macs(model, pixel_values) -> int:
    """MACs of one forward; the class names' text embeddings are computed (and cached) first, as in the
    timed forwards, so the text tower is not counted."""
    from opentrans_hf.utils.flops import flop_counter

    with torch.inference_mode():
        model(pixel_values=pixel_values, class_names=CLASS_NAMES)
    with torch.inference_mode(), flop_counter() as counter:
        model(pixel_values=pixel_values, class_names=CLASS_NAMES)
    return counter.get_total_flops() // 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    parser.add_argument("--repeats", type=int, default=1, help="forwards per variant per round (their mean)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant first")
    parser.add_argument("--skip_frameworks", action="store_true", help="time the vision tower only")
    parser.add_argument("--quick", action="store_true", help="the tiny CLIP, 1 round: checks that it runs")
    args = parser.parse_args()
    from opentrans_hf.utils.hub import quiet_loading

    size = "tiny" if args.quick else "vit-b16"
    if args.quick:
        args.rounds, args.repeats, args.warmup = 1, 1, 0
    torch.manual_seed(0)
    print(f"CLIP {size} vision tower, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} interleaved rounds x {args.repeats} forward(s), warm-up {args.warmup}", flush=True)
    # the tiny CLIP's 4 heads cannot lose 90% with the default cap (one head kept per layer)
    with quiet_loading():
        variants, mask90, macs, info = tower_variants(size, 1.0 if args.quick else 0.99)
    image = variants["dense"].config.image_size
    print(f"90% layerwise mask: sparsity {100 * info['mask90_sparsity']:.2f}%, {info['csr_layers']}/"
          f"{info['masked_layers']} layers exported to CSR", flush=True)
    for name, text in info["structured"].items():
        print(f"{name} mask: sparsity {text}", flush=True)
    result: dict[str, float] = {}
    times = {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in BATCHES:
            x = torch.randn(batch, 3, image, image, generator=generator)
            fns = {n: (lambda m=m: m(pixel_values=x)) for n, m in variants.items()}
            times[batch] = time_interleaved(fns, args.rounds, args.repeats, args.warmup, f"tower b{batch} ")
    mem = {n: tensor_bytes(m) for n, m in variants.items()}
    with quiet_loading():
        sizes = storage_sizes(variants, mask90)

    print(f"\nvision tower forward ({image} px, CPU, median of {args.rounds} rounds)")
    head = "| variant | " + " | ".join(f"b{b} ms | b{b} speed-up" for b in BATCHES) + " | FLOP ratio | params+buffers MB |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    labels = {"dense": "dense", "hooks90": "90% layerwise, mask hooks", "baked90": "90% layerwise, baked (zeros)",
              "csr90": "90% layerwise, CSR export", "structured50": "structured 50%, compacted",
              "structured90": "structured 90%, compacted",
              "structured_layerwise50": "structured-layerwise 50%, compacted"}
    for n in variants:
        cells = []
        for b in BATCHES:
            ratio = times[b]["dense"] / times[b][n]
            cells.append(f"{1e3 * times[b][n]:.1f} | {ratio:.2f}x")
            if n != "dense":
                key = "hooks90_ratio" if n == "hooks90" else f"{n}_speedup"
                result[f"{key}_b{b}"] = ratio
        flops_ratio = macs["dense"] / macs[n]
        if n != "dense":
            result[f"flops_ratio_{n}"] = flops_ratio
            result[f"memory_ratio_{n}"] = mem["dense"] / mem[n]
        print(f"| {labels[n]} | " + " | ".join(cells) + f" | {flops_ratio:.2f}x | {mem[n] / 2**20:.1f} |")

    print("\nfile size on disk")
    print("| stored as | MB | dense / this |")
    print("|---|---|---|")
    size_labels = {"dense": "dense model.safetensors", "sparse_storage90": "90%: sparse storage (values + bit mask)",
                   "csr90": "90%: CSR state dict (values + int32 indices)",
                   "structured50": "structured 50%, compacted", "structured90": "structured 90%, compacted",
                   "structured_layerwise50": "structured-layerwise 50%, compacted"}
    for n, b in sizes.items():
        print(f"| {size_labels[n]} | {b / 1e6:.1f} | {sizes['dense'] / b:.2f}x |")
    result["storage_ratio_90"] = sizes["dense"] / sizes["sparse_storage90"]
    result["storage_ratio_csr90"] = sizes["dense"] / sizes["csr90"]
    result["storage_ratio_structured50"] = sizes["dense"] / sizes["structured50"]
    result["storage_ratio_structured90"] = sizes["dense"] / sizes["structured90"]
    result["storage_ratio_structured_layerwise50"] = sizes["dense"] / sizes["structured_layerwise50"]
    del variants
    gc.collect()

    if not args.skip_frameworks:
        with tempfile.TemporaryDirectory() as tmp, quiet_loading():
            frameworks, notes = framework_variants(size, Path(tmp))
        for note in notes.values():
            print(note)
        tower_saved = {"structured50": macs["dense"] - macs["structured50"], "csr90": macs["dense"] - macs["csr90"]}
        rows = []
        for fw, models in frameworks.items():
            x1 = torch.randn(1, 3, image, image, generator=generator)
            dense_macs = framework_macs(models["dense"], x1)
            with torch.inference_mode():
                fns = {n: (lambda m=m: m(pixel_values=x1, class_names=CLASS_NAMES)) for n, m in models.items()}
                t = time_interleaved(fns, args.rounds, args.repeats, args.warmup, f"{fw} b1 ")
            for n in models:
                variant_macs = dense_macs - tower_saved.get(n, 0)
                ratio, fr = t["dense"] / t[n], dense_macs / variant_macs
                rows.append((fw, n, t[n], ratio, fr, tensor_bytes(models[n])))
                if n != "dense":
                    result[f"framework_{fw}_{n}_speedup_b1"] = ratio
                    result[f"framework_{fw}_flops_ratio_{n}"] = fr
            del models
            gc.collect()
        print(f"\nwhole framework forward (batch 1, {image} px, {len(CLASS_NAMES)} class names, eval, CPU)")
        print("| framework | encoder | ms | speed-up | FLOP ratio (whole forward) | params+buffers MB |")
        print("|---|---|---|---|---|---|")
        for fw, n, t, ratio, fr, b in rows:
            print(f"| {fw} | {labels[n]} | {1e3 * t:.1f} | {ratio:.2f}x | {fr:.2f}x | {b / 2**20:.1f} |")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bad = {k: v for k, v in result.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise SystemExit(f"non-positive or non-finite results: {bad}")
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
