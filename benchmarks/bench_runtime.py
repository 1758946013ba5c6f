"""Overhead of the streaming runtime per slice, against calling the backend directly (CPU).

Two backends: `null` (restore_normalized returns its input: what is left is the runtime's own
cost: clip-and-scale, queueing, the worker hand-off, the call into Python, de-normalisation)
and `tiny` (the tiny golden AMIR on the eager backend: the overhead next to real compute).
"direct" is Restorer.restore_slices-style work on whole batches in numpy (normalize, backend,
denormalize); "stream" pushes the same slices one by one from a producer thread and pops them
in a consumer thread. Median of --repeats runs; microseconds per slice, wall clock and CPU
(all threads).

    python benchmarks/bench_runtime.py [--slices 512] [--batch 8] [--sizes 64 128 256] [--repeats 5]
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


def direct(restorer, slices: np.ndarray, batch: int) -> tuple[float, float]:
    """Batches through the backend from a (non-main) thread, as the stream's worker calls it: on a
    busy CPU, torch's intra-op threads run far slower when called from the main thread (measured
    10x on a loaded 2-core machine), which would swamp the comparison."""
    task = restorer.task

    def body():
        for i in range(0, len(slices), batch):
            x = task.normalize(slices[i:i + batch])
            task.denormalize(restorer.restore_normalized(x)).astype(np.float32, copy=False)

    start, cpu = time.perf_counter(), time.process_time()
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return time.perf_counter() - start, time.process_time() - cpu


def streamed(restorer, slices: np.ndarray, batch: int) -> tuple[float, float]:
    with Stream(restorer, batch_size=batch, queue_depth=4 * batch, max_wait=0.001) as stream:
        def produce():
            for s in slices:
                stream.push(s)
            stream.finish()

        start, cpu = time.perf_counter(), time.process_time()
        producer = threading.Thread(target=produce)
        producer.start()
        n = sum(1 for _ in stream)
        producer.join()
        elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert n == len(slices)
    return elapsed


def median_times(fns, repeats: int) -> list[tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, run interleaved so that a change in machine
    load hits all alike. CPU time (all threads of the process) is the steadier measure of cost
    on a shared machine; wall time includes waiting for a core."""
    for fn in fns:
        fn()  # warm-up (thread pools, allocator, first-call costs)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(fn())
    return [(statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="slice sides, null backend")
    parser.add_argument("--model-sizes", type=int, nargs="+", default=[64], help="slice sides, tiny AMIR")
    parser.add_argument("--model-slices", type=int, default=32, help="slices per run, tiny AMIR")
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
    print("| backend | slice | slices | direct wall | stream wall | wall overhead | direct CPU | stream CPU | CPU overhead |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for name in args.backends:
        restorer = restorers[name]
        for size in args.sizes if name == "null" else args.model_sizes:
            n = args.slices if name == "null" else args.model_slices  # the model is slow on a CPU
            slices = rng.uniform(-1300, 3400, (n, size, size)).astype(np.float32)
            (wd, cd), (ws, cs) = ((w / n * 1e6, c / n * 1e6) for w, c in median_times(
                [lambda: direct(restorer, slices, args.batch), lambda: streamed(restorer, slices, args.batch)],
                args.repeats))
            print(f"| {name} | {size}x{size} | {n} | {wd:.1f} | {ws:.1f} | {ws - wd:+.1f} "
                  f"| {cd:.1f} | {cs:.1f} | {cs - cd:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
