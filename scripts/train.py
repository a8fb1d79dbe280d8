"""Fine-tune an open-vocabulary segmentation framework with a transferred sparse mask and spectral
tuning, then evaluate zero-shot. Runs under `accelerate launch` (any number of processes) and `python`.

    accelerate launch scripts/train.py --framework deeplabv3 --freeze_rule median --mask runs/prune/mask \
        --output_dir runs/train

All arguments: `python scripts/train.py --help` (same as `opentrans-hf train`).
"""

import sys

from opentrans_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
