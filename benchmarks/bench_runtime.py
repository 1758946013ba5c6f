"""Overhead of the streaming runtime per slice, against calling the backend directly (CPU).

Two backends: `null` (restore_normalized returns its input: what is left is the runtime's own
cost: clip-and-scale, queueing, the worker hand-off, the call into Python, de-normalisation)
and `tiny` (the tiny golden AMIR on the eager backend: the overhead next to real compute).
"direct" is Restorer.restore_slices-style work on whole batches in numpy (normalize, backend,
denormalize); "stream" pushes the same slices one by one from a producer thread and pops them
in a consumer thread. Median of --repeats runs.

    python benchmarks/bench_runtime.py [--slices 512] [--batch 8] [--sizes 64 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from medir_fast.model import build_model, read_state_dict
from medir_fast.restorer import Restorer
from medir_fast.runtime import Stream
from medir_fast.tasks import get_task

TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny_state_dict.pth"


class NullRestorer:
    """restore_normalized that costs nothing: isolates the runtime's overhead."""

    def __init__(self, task):
        self.task = task

    def restore_normalized(self, batch: np.ndarray) -> np.ndarray:
        return batch


def direct(restorer, slices: np.ndarray, batch: int) -> float:
    task = restorer.task
    start = time.perf_counter()
    for i in range(0, len(slices), batch):
        x = task.normalize(slices[i:i + batch])
        task.denormalize(restorer.restore_normalized(x)).astype(np.float32, copy=False)
    return time.perf_counter() - start


def streamed(restorer, slices: np.ndarray, batch: int) -> float:
    with Stream(restorer, batch_size=batch, queue_depth=4 * batch, max_wait=0.001) as stream:
        def produce():
            for s in slices:
                stream.push(s)
            stream.finish()

        start = time.perf_counter()
        producer = threading.Thread(target=produce)
        producer.start()
        n = sum(1 for _ in stream)
        producer.join()
        elapsed = time.perf_counter() - start
    assert n == len(slices)
    return elapsed


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (thread pools, allocator, first-call costs)
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["null", "tiny"], choices=["null", "tiny"])
    args = parser.parse_args()

    task = get_task("ct_denoise")
    restorers = {"null": NullRestorer(task)}
    if "tiny" in args.backends:
        restorers["tiny"] = Restorer(build_model(read_state_dict(TINY)), task, backend="eager", device="cpu",
                                     precision="fp32", batch_size=args.batch)
    print(f"# runtime overhead, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"batch {args.batch}, median of {args.repeats}")
    print("| backend | slice | slices | direct us/slice | stream us/slice | overhead us/slice |")
    print("| --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for name in args.backends:
        restorer = restorers[name]
        for size in args.sizes:
            n = args.slices if name == "null" else max(args.batch, args.slices // 8)  # the model is slow on a CPU
            slices = rng.uniform(-1300, 3400, (n, size, size)).astype(np.float32)
            t_direct = median_time(lambda: direct(restorer, slices, args.batch), args.repeats) / n * 1e6
            t_stream = median_time(lambda: streamed(restorer, slices, args.batch), args.repeats) / n * 1e6
            print(f"| {name} | {size}x{size} | {n} | {t_direct:.1f} | {t_stream:.1f} | {t_stream - t_direct:+.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
