"""Benchmark: full fine-tuning vs spectral tuning (median rule) vs LoRA (r=16), in one run.

A random-initialised CLIP ViT-B/16 vision tower (opentrans_hf.embedded.random_clip) with a light segmentation
head (1x1 conv on the patch tokens, 150 classes, loss on the patch grid; ``--loss_resolution full``
upsamples the logits to 224 x 224 first), 224 px, batch 4, AdamW, CPU. Each method runs in its
own subprocess (so peak memory is its own): warm-up steps, then timed steps; it reports the median
step time, peak RSS, optimizer state size, trainable parameters and the training FLOPs counted by
``estimate_training_flops``. The check: the measured spectral/full step-time ratio against the ratio
the FLOP count predicts (target: within 5%).

Usage: ``python scripts/bench_training.py [--steps 4] [--warmup 1] [--batch 4]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def build(method: str, batch: int, loss_resolution: str = "grid"):
    import torch
    from torch import nn

    from opentrans_hf import SpectralTuningConfig, estimate_training_flops, get_spectral_model
    from opentrans_hf.embedded.random_clip import build_random_clip_vision

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = build_random_clip_vision("vit-b16", seed=0)
            self.head = nn.Conv2d(768, 150, 1)

        def forward(self, pixel_values, labels):
            tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]
            g = int(tokens.shape[1] ** 0.5)
            logits = self.head(tokens.transpose(1, 2).reshape(tokens.shape[0], 768, g, g))
            if loss_resolution == "full":  # upsample 150-class logits to 224 x 224: heavy element-wise work
                logits = nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear")
            else:  # loss on the patch grid, labels subsampled (nearest)
                labels = labels[:, g // 2 :: labels.shape[-1] // g, g // 2 :: labels.shape[-1] // g][:, :g, :g]
            return nn.functional.cross_entropy(logits, labels)

    torch.manual_seed(0)
    model = Segmenter()
    model.vision_model.post_layernorm.requires_grad_(False)  # unused by the head in every method
    if method == "spectral":
        model = get_spectral_model(model, SpectralTuningConfig(target_modules=r"vision_model\.encoder\.layers\.\d+\..*"))
    elif method == "lora":
        import peft

        for p in model.parameters():
            p.requires_grad_(False)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], modules_to_save=["head"])
        model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(batch, 3, 224, 224, generator=g),
             "labels": torch.randint(0, 150, (batch, 224, 224), generator=g)}
    flops = estimate_training_flops(model, batch, loss_fn=lambda loss: loss)
    return model, batch, flops


def child(method: str, steps: int, warmup: int, batch_size: int, loss_resolution: str) -> dict:
    import torch

    model, batch, flops = build(method, batch_size, loss_resolution)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "method": method,
        "step_s": statistics.median(times),
        "step_times": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_state_mb": state_bytes / 2**20,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "train_gflops": flops["tuned"]["total"] / 1e9,
        "full_gflops": flops["full"]["total"] / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (full, spectral, lora) processes, interleaved; per method the fastest "
                             "round's median step counts (the machine is shared and noisy)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--loss_resolution", default="grid", choices=["grid", "full"],
                        help="grid: loss on the 14x14 patch grid (a light head); full: logits upsampled to 224x224")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.batch, args.loss_resolution)))
        return
    rows = {}
    for rep in range(args.repeats):
        for method in ("full", "spectral", "lora"):
            out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--batch", str(args.batch),
                                  "--loss_resolution", args.loss_resolution],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {rep + 1}: {method:9s} median step {r['step_s']:6.2f}s", flush=True)
            if method not in rows or r["step_s"] < rows[method]["step_s"]:
                rows[method] = r
    print()
    for method, r in rows.items():
        print(f"{method:9s} step {r['step_s']:6.2f}s  peak RSS {r['peak_rss_mb']:7.0f} MB  optimizer state "
              f"{r['optimizer_state_mb']:7.1f} MB  trainable {r['trainable'] / 1e6:6.2f}M / {r['total'] / 1e6:.2f}M  "
              f"train step {r['train_gflops']:7.1f} GFLOP", flush=True)
    full, spec = rows["full"], rows["spectral"]
    measured = spec["step_s"] / full["step_s"]
    predicted = spec["train_gflops"] / full["train_gflops"]
    print(f"\nspectral/full step time: measured {measured:.3f}, predicted by FLOPs {predicted:.3f} "
          f"-> off by {100 * abs(measured - predicted) / predicted:.1f}% (target <= 5%)")
    print(f"training FLOPs saved by spectral tuning: {100 * (1 - predicted):.1f}%; "
          f"lora/full step time {rows['lora']['step_s'] / full['step_s']:.3f}")


if __name__ == "__main__":
    main()
