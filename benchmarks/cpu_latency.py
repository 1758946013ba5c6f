"""CPU latency per slice of one or more backends, default AMIR configuration (random weights)
or given weights.

    python benchmarks/cpu_latency.py [--size 256] [--batch 1] [--repeats 5] [--self-ensemble] [--tile N]
                                     [--backends eager,onnxruntime] [--weights slim] [--json out.json]

Times `Restorer.restore_normalized` (padding, tiling, backend, crop) after one warm-up run per
backend (which also builds an engine that is not cached yet); with several backends the rounds
alternate between them, so that a busy machine biases none. Reports each one's median and spread
and the ratio of medians against the first; threads = torch's default (all cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from medir_fast import Restorer, load_model
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
    p.add_argument("--backends", default="eager", help="comma-separated backends, timed in alternating rounds")
    p.add_argument("--weights", default=None, help="a shipped name or checkpoint instead of random weights")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.weights:
        model = load_model(args.weights)
    else:
        model = AMIR(**(DEFAULT_CONFIG if args.config == "default" else {**DEFAULT_CONFIG, **json.loads(args.config)}))
    backends = args.backends.split(",")
    restorers = {b: Restorer(model, "ct_denoise", backend=b, device="cpu", precision=args.precision,
                             batch_size=args.batch, tile=args.tile or 0, self_ensemble=args.self_ensemble)
                 for b in backends}
    x = np.random.default_rng(0).random((args.batch, args.size, args.size), dtype=np.float32)
    times = {b: [] for b in backends}
    for restorer in restorers.values():
        restorer.restore_normalized(x)  # warm-up
    for _ in range(args.repeats):
        for b, restorer in restorers.items():
            t0 = time.perf_counter()
            restorer.restore_normalized(x)
            times[b].append((time.perf_counter() - t0) / args.batch)
    medians = {b: statistics.median(t) for b, t in times.items()}
    result = dict(
        what=f"{args.precision}, {args.batch} x {args.size}x{args.size}, "
             + (f"weights {args.weights}" if args.weights else f"config {args.config}")
             + (", self-ensemble" if args.self_ensemble else "") + (f", {args.tile}x{args.tile} tiles" if args.tile else ""),
        backends={b: dict(seconds_per_slice_median=medians[b], seconds_per_slice_min=min(t),
                          seconds_per_slice_max=max(t), speedup_vs_first=medians[backends[0]] / medians[b])
                  for b, t in times.items()},
        repeats=args.repeats, threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
