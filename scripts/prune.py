"""Semantic-agnostic iterative magnitude pruning of a CLIP image encoder (OpenTrans step 1).

    accelerate launch scripts/prune.py --model_name_or_path openai/clip-vit-base-patch16 \
        --dataset <hf segmentation dataset or dir> --num_rounds 22 --steps_per_round 5000 --output_dir runs/prune

Defaults run on the embedded procedural dataset with a random-initialised small CLIP (no downloads).
Writes <output_dir>/round_XX/ (mask adapter after every round; an interrupted run resumes), the final
mask in <output_dir>/mask/, its per-layer sparsity plot, and params/MACs in <output_dir>/counts.json.

All arguments: `python scripts/prune.py --help` (same as `opentrans-hf prune`).
"""

import sys

from opentrans_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
