"""The whole OpenTrans pipeline (pretrained CLIP, spectral analysis, IMP, spectral fine-tuning with the
mask, evaluation beside the baselines). Runs under `accelerate launch` (any number of processes) and `python`.

    accelerate launch scripts/demo.py --output_dir runs/demo

All arguments: `python scripts/demo.py --help` (same as `opentrans-hf demo`).
"""

import sys

from opentrans_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
