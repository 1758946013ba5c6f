"""CPU latency of the eager backend per slice, default AMIR configuration (random weights).

    python benchmarks/cpu_latency.py [--size 256] [--batch 1] [--repeats 5] [--self-ensemble] [--tile N] [--json out.json]

Times `Restorer.restore_normalized` (padding, backend, crop) after one warm-up run, reports
the median and the spread; threads = torch's default (all cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from medir_fast import Restorer
from medir_fast.model import AMIR, DEFAULT_CONFIG


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--config", default="default", help="'default' or a JSON dict of AMIR arguments")
    p.add_argument("--self-ensemble", action="store_true", help="time the 8-way flip-and-turn average")
    p.add_argument("--tile", type=int, default=None, help="time N x N overlapping tiles instead of whole slices")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    config = DEFAULT_CONFIG if args.config == "default" else {**DEFAULT_CONFIG, **json.loads(args.config)}
    restorer = Restorer(AMIR(**config), "ct_denoise", backend="eager", device="cpu",
                        precision=args.precision, batch_size=args.batch, tile=args.tile, self_ensemble=args.self_ensemble)
    x = np.random.default_rng(0).random((args.batch, args.size, args.size), dtype=np.float32)
    restorer.restore_normalized(x)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        restorer.restore_normalized(x)
        times.append((time.perf_counter() - t0) / args.batch)
    result = dict(
        what=f"eager {args.precision}, {args.batch} x {args.size}x{args.size}, config {args.config}"
             + (", self-ensemble" if args.self_ensemble else "") + (f", {args.tile}x{args.tile} tiles" if args.tile else ""),
        seconds_per_slice_median=statistics.median(times), seconds_per_slice_min=min(times),
        seconds_per_slice_max=max(times), repeats=args.repeats, threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
