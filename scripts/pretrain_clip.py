"""Pretrain a small CLIP on the embedded dataset's captioned images (contrastive + caption-derived patch
losses). Runs under `accelerate launch` (any number of processes) and `python`.

    accelerate launch scripts/pretrain_clip.py --size small --output_dir runs/clip

All arguments: `python scripts/pretrain_clip.py --help` (same as `opentrans-hf pretrain-clip`).
"""

import sys

from opentrans_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain-clip", *sys.argv[1:]]))
