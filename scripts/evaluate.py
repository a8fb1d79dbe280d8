"""Zero-shot evaluation of a trained OVS model on several datasets, one table (mIoU, pixel accuracy,
seen/unseen mIoU). Runs under `accelerate launch` (the confusion matrices are summed across processes)
and `python`.

    accelerate launch scripts/evaluate.py --model runs/demo/train/model \
        --datasets embedded:validation scene_parse_150:validation

All arguments: `python scripts/evaluate.py --help` (same as `opentrans-hf evaluate`).
"""

import sys

from opentrans_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
