"""Run by tests/test_tuning_ddp.py under `accelerate launch --num_processes 2 --cpu`: spectral tuning
of a tiny CLIP vision tower with a light segmentation head, a few DDP steps; each rank writes what
it saw to OUT/rank{R}.json."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import CLIPVisionModel

from opentrans_hf import SpectralTuningConfig, freeze_unused_parameters, get_spectral_model


class Segmenter(nn.Module):
    def __init__(self, clip_dir):
        super().__init__()
        self.vision_model = CLIPVisionModel.from_pretrained(clip_dir)
        self.head = nn.Conv2d(self.vision_model.config.hidden_size, 3, 1)

    def forward(self, pixel_values, labels=None):
        tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # post_layernorm unused
        g = int(tokens.shape[1] ** 0.5)
        logits = self.head(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g))
        logits = nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear")
        return nn.functional.cross_entropy(logits, labels)


def main(clip_dir, out):
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Segmenter(clip_dir)
    spectral = get_spectral_model(model, SpectralTuningConfig(target_modules=r"vision_model\.encoder\.layers\.\d+\..*",
                                                             modules_to_save=["head"]))
    g = torch.Generator().manual_seed(1 + acc.process_index)  # different data on each rank
    batch = {"pixel_values": torch.randn(2, 3, 30, 30, generator=g), "labels": torch.randint(0, 3, (2, 30, 30), generator=g)}
    unused = freeze_unused_parameters(spectral, batch, loss_fn=lambda loss: loss)
    before = {n: p.detach().clone() for n, p in spectral.named_parameters()}
    opt = torch.optim.AdamW([p for p in spectral.parameters() if p.requires_grad], lr=1e-2)
    spectral_ddp, opt = acc.prepare(spectral, opt)
    for _ in range(3):
        loss = spectral_ddp(**batch)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    after = dict(acc.unwrap_model(spectral_ddp).named_parameters())
    report = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "unused": unused,
        "frozen": sorted(n for n, p in after.items() if not p.requires_grad),
        "frozen_unchanged": all(torch.equal(after[n], before[n]) for n, p in after.items() if not p.requires_grad),
        "trainable_changed": all(not torch.equal(after[n], before[n]) for n, p in after.items() if p.requires_grad),
        "trainable_sums": {n: float(p.detach().double().sum()) for n, p in after.items() if p.requires_grad},
    }
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
