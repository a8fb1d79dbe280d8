"""Benchmark: a 22-round (90.2%) global magnitude mask on a CLIP ViT-B/16 vision tower.

Reports the adapter's size on disk (bits per masked weight, header included), dense vs effective
parameters and MACs (count_params_and_flops), and the cost of keeping the mask applied: forward time
with the mask hooks vs the same (already sparse) weights without hooks, best of --repeats, one run.
Usage: ``python scripts/bench_masks.py [--repeats 5]``.
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="vit-b16")
    args = parser.parse_args()
    from opentrans_hf import IMPConfig, SparseMask, count_params_and_flops, magnitude_prune
    from opentrans_hf.embedded.random_clip import build_random_clip_vision

    model = build_random_clip_vision(args.size).eval()
    sparsity = IMPConfig().sparsity_after(22)
    mask = magnitude_prune(model, sparsity)
    with tempfile.TemporaryDirectory() as d:
        mask.save_pretrained(d)
        size = (Path(d) / "adapter_model.safetensors").stat().st_size
    print(f"mask: {len(mask.masks)} tensors, {mask.num_weights:,d} weights, sparsity {100 * mask.sparsity:.2f}%")
    print(f"adapter_model.safetensors: {size / 2**20:.2f} MiB = {8 * size / mask.num_weights:.4f} bits per masked weight")
    c = count_params_and_flops(model, mask)
    print(f"params: {c['params'] / 1e6:.2f}M dense -> {c['effective_params'] / 1e6:.2f}M effective "
          f"({100 * c['effective_params'] / c['params']:.1f}%)")
    print(f"MACs:   {c['macs'] / 1e9:.2f}G dense -> {c['effective_macs'] / 1e9:.2f}G effective "
          f"({100 * c['effective_macs'] / c['macs']:.1f}%) per 224px image")
    hooked = copy.deepcopy(model)
    mask.apply(hooked)
    plain = copy.deepcopy(hooked)
    SparseMask.remove(plain, bake=True)
    x = torch.randn(4, 3, 224, 224)

    def best(m):
        times = []
        with torch.no_grad():
            m(pixel_values=x)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                m(pixel_values=x)
                times.append(time.perf_counter() - t0)
        return min(times)

    t_plain, t_hooked = best(plain), best(hooked)
    print(f"forward (batch 4): plain {t_plain:.3f}s, with mask hooks {t_hooked:.3f}s -> overhead "
          f"{100 * (t_hooked / t_plain - 1):.1f}%")


if __name__ == "__main__":
    main()
