"""The paper's two tables in miniature (subnetwork transfer; efficient fine-tuning), over several seeds,
with a noise statement per comparison -> results.json, results.md, mIoU_vs_flops.png.

    python scripts/reproduce.py --quick                 # one seed, fewer steps: a few minutes on CPU
    python scripts/reproduce.py --output_dir runs/reproduce

All arguments: `python scripts/reproduce.py --help` (same as `opentrans-hf reproduce`).
"""

import sys

from opentrans_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
