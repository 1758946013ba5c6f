"""Clocks, memory and interleaved rounds for `medir-fast bench`.

Every row of a shape is timed in the same rounds, in a rotating order, so that a machine that
gets busier or throttles during the run biases no row. On CUDA a call is timed by CUDA events
(after warm-up, so compilation, autotuning and graph capture are not in it); on the CPU by the
wall clock and by the process's CPU time (all threads). Peak memory per call: CUDA's maximum
allocated, or on the CPU the process's peak resident set, reset before each call through
/proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROUNDS = 5  # interleaved rounds per shape; each row runs about min_time / ROUNDS seconds in each
MB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Timing:
    """One row's calls: milliseconds per call (device time on CUDA, wall on the CPU), CPU
    milliseconds per call, the peak memory seen and its rise over the level before the call."""

    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    added_bytes: int | None = None

    def add(self, ms: float, cpu_ms: float, peak: int | None, before: int | None) -> None:
        self.ms.append(ms)
        self.cpu_ms.append(cpu_ms)
        if peak is not None:
            self.peak_bytes = max(self.peak_bytes or 0, peak)
            self.added_bytes = max(self.added_bytes or 0, peak - before)

    def summary(self) -> dict[str, float | int | None]:
        return dict(calls=len(self.ms), p10_ms=percentile(self.ms, 10), p50_ms=percentile(self.ms, 50),
                    p90_ms=percentile(self.ms, 90), p99_ms=percentile(self.ms, 99),
                    cpu_ms_p50=percentile(self.cpu_ms, 50),
                    peak_mem_mb=None if self.peak_bytes is None else self.peak_bytes / MB,
                    added_mem_mb=None if self.added_bytes is None else self.added_bytes / MB)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _rss_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_peak_available() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return _rss_kb("VmHWM") is not None
    except OSError:
        return False


class Clock:
    """Times one call on a device: returns (output, ms, cpu_ms); records memory into a Timing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_peak = device.type == "cpu" and cpu_peak_available()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, timing: Timing | None = None):
        before = peak = None
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # the events on this device's stream
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                cpu0 = time.process_time()
                start.record()
                out = fn(x)
                end.record()
                end.synchronize()
                cpu_ms = (time.process_time() - cpu0) * 1e3
                ms = start.elapsed_time(end)
                peak = torch.cuda.max_memory_allocated()
        else:
            if self.cpu_peak:
                _CLEAR_REFS.write_text("5")
                before = _rss_kb("VmRSS")
            t0, cpu0 = time.perf_counter(), time.process_time()
            out = fn(x)
            ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - cpu0) * 1e3
            if self.cpu_peak:
                peak = _rss_kb("VmHWM")
        if timing is not None:
            timing.add(ms, cpu_ms, peak, before)
        return out, ms, cpu_ms

    def first_call(self, fn, x) -> tuple[torch.Tensor, float]:
        """The first output and its wall-clock seconds (everything a first call does included)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn(x)
        self.sync()
        return out, time.perf_counter() - t0


@dataclass
class Timed:
    """What one row times: `call(x)` on the row's own clock (a CPU baseline beside CUDA rows
    is timed by the wall clock, with the process's resident memory)."""

    call: Callable
    x: object
    clock: Clock

    def __call__(self, timing: Timing | None = None) -> float:
        return self.clock.call(self.call, self.x, timing)[1]


def interleaved(rows: dict[str, Timed], warmup: int, min_time: float, progress: Callable[[str], None] | None = None,
                failed: Callable[[str, BaseException], None] | None = None) -> dict[str, Timing]:
    """Warm-up, then ROUNDS rounds in which each row runs for about min_time / ROUNDS seconds
    (at least one call), the order rotating from round to round. A row that raises is
    reported to `failed` and dropped."""
    timings = {name: Timing() for name in rows}
    live = list(rows)

    def guarded(name, body):
        try:
            body()
        except Exception as exc:  # a row that breaks mid-run is reported, the others go on
            live.remove(name)
            timings.pop(name)
            if failed is not None:
                failed(name, exc)

    for _ in range(warmup):
        for name in list(live):
            guarded(name, rows[name])
    share = min_time / ROUNDS
    for r in range(ROUNDS):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for name in order:
            def run_share(name=name):
                spent = 0.0
                while True:
                    spent += rows[name](timings[name]) / 1e3
                    if spent >= share:
                        break
            if name in live:
                guarded(name, run_share)
            if progress is not None:
                progress(name)
    return timings
