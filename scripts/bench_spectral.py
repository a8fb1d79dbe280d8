"""Benchmark: opentrans-hf's spectral analysis vs WeightWatcher 0.7.7 and the eigenvalue floor.

One run, one process, on a random-initialised CLIP ViT-B/16 vision tower (opentrans_hf.embedded.random_clip):

* weightwatcher 0.7.7 ``WeightWatcher(model).analyze()`` (defaults)
* ``analyze_spectra(estimator="ww")`` float64 (exact) and ``precision="float32"`` (fast mode)
* the floor: only the float64 eigenvalues of the very same matrices, computed by the engine
  analyze_spectra itself uses (Gram + symmetric eigensolver, one layer per thread), no model walk,
  no fit, no bookkeeping
* ``analyze_spectra(estimator="opentrans")``; ``device="cuda"`` too when a GPU is present

Times are the best of ``--repeats`` runs (the machine is shared and noisy); ratios compare runs made
here, seconds apart. Usage: ``python scripts/bench_spectral.py [--size vit-b16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit-b16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ww-repeats", type=int, default=1)
    args = parser.parse_args()

    from opentrans_hf import analyze_spectra
    from opentrans_hf.embedded.random_clip import build_random_clip_vision
    from opentrans_hf.spectral.analyze import layer_eigenvalues
    from opentrans_hf.spectral.layers import iter_layer_matrices

    model = build_random_clip_vision(args.size)
    print(f"model: random CLIP {args.size} vision tower, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # the floor: float64 eigenvalues of the same matrices with the same engine, nothing else
    specs = [s for s in iter_layer_matrices(model, "ww") if s.skip_reason is None]

    def floor():
        with torch.no_grad():
            for _ in layer_eigenvalues(specs, range(len(specs))):
                pass

    def ours(**kw):
        return lambda: analyze_spectra(model, estimator="ww", **kw)

    rows = []
    t_floor, _ = best_of(floor, args.repeats)
    rows.append(("eigenvalue floor (float64, same matrices)", t_floor))
    t64, rep64 = best_of(ours(), args.repeats)
    rows.append(("analyze_spectra(estimator='ww')", t64))
    t32, rep32 = best_of(ours(precision="float32"), args.repeats)
    rows.append(("analyze_spectra(estimator='ww', precision='float32')", t32))
    t_ot, _ = best_of(lambda: analyze_spectra(model, estimator="opentrans"), args.repeats)
    rows.append(("analyze_spectra(estimator='opentrans')", t_ot))
    t_cuda = None
    if torch.cuda.is_available():
        analyze_spectra(model, estimator="ww", device="cuda")  # warm-up (CUDA context, kernels)
        t_cuda, rep_cuda = best_of(ours(device="cuda"), args.repeats)
        rows.append(("analyze_spectra(estimator='ww', device='cuda')", t_cuda))

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    t_ww, df = best_of(lambda: ww.WeightWatcher(model=model).analyze(), args.ww_repeats)
    rows.append(("weightwatcher 0.7.7 analyze()", t_ww))

    ref = {r["longname"]: r for _, r in df.iterrows()}
    a64, a32 = rep64.alphas, rep32.alphas
    assert set(a64) == set(ref), "analysed layers differ from weightwatcher's"
    diff64 = max(abs(a64[n] - ref[n]["alpha"]) for n in ref)
    xmin_same = all(abs(rep64[n].xmin - ref[n]["xmin"]) <= 1e-9 * ref[n]["xmin"] for n in ref)
    rel32 = max(abs(a32[n] - a64[n]) / a64[n] for n in a64)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'method':<{width}}  seconds")
    for name, t in rows:
        print(f"{name:<{width}}  {t:7.2f}")
    print(f"\nlayers analysed: {len(a64)} (same set as weightwatcher), xmin identical: {xmin_same}")
    print(f"speed-up vs weightwatcher (float64):  {t_ww / t64:6.1f}x   (target >= 3x)")
    print(f"speed-up vs weightwatcher (float32):  {t_ww / t32:6.1f}x   (target >= 5x)")
    print(f"float64 time / eigenvalue floor:       {t64 / t_floor:6.2f}x  (target <= 1.25x)")
    print(f"max |alpha - weightwatcher alpha|:     {diff64:.2e}   (target <= 1e-6)")
    print(f"max relative alpha diff float32/64:    {rel32:.2e}   (target <= 1e-3)")
    print(f"opentrans estimator / ww estimator:    {t_ot / t64:6.2f}x")
    if t_cuda is not None:
        diff_cuda = max(abs(rep_cuda.alphas[n] - a64[n]) for n in a64)
        print(f"cuda speed-up vs CPU float64:          {t64 / t_cuda:6.1f}x, max |alpha diff| {diff_cuda:.2e}")


if __name__ == "__main__":
    main()
