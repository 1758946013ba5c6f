"""Train the shipped default: fetch the anatomy, build the protocol-v1 pairs, run `medir-fast train`.

Usage: python experiments/train_default.py OUT_DIR --time-budget MINUTES (or --steps N) [extra train flags]
The paired set goes to ~/.cache/medir-fast/protocol-v1 (built once).
"""

import argparse
import sys

from medir_fast.lab import paired, training


def main() -> int:
    root = paired.CACHE / "protocol-v1"
    if not (root / "PET" / "test" / "HQ").is_dir():
        paired.build_pairs(root)
    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    args = parser.parse_args([str(root), "--out", sys.argv[1], "--config", "slim", "--lr", "4e-4",
                              "--batch-size", "6", "--crop", "64", "--threads", "1", "--save-every", "50",
                              "--resume", *sys.argv[2:]])
    return training.run(args)


if __name__ == "__main__":
    sys.exit(main())
