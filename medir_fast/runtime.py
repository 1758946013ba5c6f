"""Streaming restoration: push slices as they arrive, pop restored slices in push order.

A thin layer over the C++ runtime (`medir_fast._runtime`, csrc/): a worker thread batches the
pushed slices (when `batch_size` are waiting, or when the oldest has waited `max_wait`
seconds), calls `restorer.restore_normalized` on them and maps the result back to the task's
units. Clip-and-scale and its inverse use `restorer.task.lo/hi`, like `Restorer.restore_slices`.
At most `queue_depth` slices are inside the stream (pushed, not yet popped): a full stream
blocks `push` (block=True) or makes it return False (block=False).

Push and pop from different threads (one producer, one consumer), or alternate them in one
thread with block=False; a single thread that pushes everything before popping deadlocks on a
blocking stream once `queue_depth` slices are waiting.

    with Stream(restorer, batch_size=8) as stream:   # producer thread: push, then finish()
        ...
        for restored in stream:                      # consumer thread: slices in push order
            ...
"""

from __future__ import annotations

import numpy as np

from . import _runtime
from .io import NAN_POLICIES

POLL_SECONDS = 0.1  # longest a consumer waits inside the runtime before Python can handle a signal

StreamClosed = _runtime.StreamClosed  # RuntimeError: push after finish()/close() or after a backend failure


class StreamEnded(EOFError):
    """pop() after finish() once every result was popped."""


class SliceFailed(RuntimeError):
    """A slice the runtime could not restore (the backend raised, or its output has NaN or
    infinite voxels: `nonfinite` counts them); the stream carries on delivering."""

    def __init__(self, index: int, reason: str, nonfinite: int = 0):
        super().__init__(f"slice {index} failed: {reason}")
        self.index = index
        self.reason = reason
        self.nonfinite = nonfinite


class Stream:
    """Streaming restorer for slices of one size (`shape`, or that of the first pushed slice).

    nan_policy: one of `restorer.NAN_POLICIES`, with the meaning it has in `restore_file` and
    `--nan-policy`: 'error' rejects a slice holding NaN/Inf at push (ValueError, stream still
    usable); 'zero' takes NaN and +-Inf as 0 in physical units before clip-and-scale, so the
    network sees clip((0 - lo) / (hi - lo), 0, 1) there (1024/4095 for CT, 0 when lo = 0).
    """

    def __init__(
        self,
        restorer,
        batch_size: int = 8,
        queue_depth: int | None = None,
        max_wait: float = 0.005,
        block: bool = True,
        nan_policy: str = "error",
        shape: tuple[int, int] | None = None,
    ):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        height, width = shape if shape is not None else (0, 0)
        backend = getattr(restorer, "backend", None)
        self._impl = _runtime.Stream(
            restorer.restore_normalized,
            lo=float(restorer.task.lo), hi=float(restorer.task.hi), height=height, width=width,
            batch_size=batch_size, queue_depth=queue_depth if queue_depth is not None else 4 * batch_size,
            max_wait=max_wait, block=block, nan_policy=nan_policy, name=getattr(backend, "name", "python"),
        )

    def push(self, slice: np.ndarray) -> bool:
        """Queue one [H, W] float32 slice (physical units; copied). False only when block=False and full."""
        if not isinstance(slice, np.ndarray):
            raise TypeError(f"slice must be a numpy array, got {type(slice).__name__}")
        return self._impl.push(slice)

    def pop(self, timeout: float | None = None) -> np.ndarray:
        """The next restored slice in push order ([H, W] float32, task units).

        Raises TimeoutError when none is ready within `timeout` seconds, SliceFailed for a slice
        that could not be restored or whose output is not finite (its turn in the order; no
        non-finite voxel is ever handed out), StreamEnded after the last one (or once the stream
        is closed).
        """
        kind, *rest = self._impl.pop(timeout)
        if kind == "ok":
            index, restored = rest
            nonfinite = int(restored.size - np.count_nonzero(np.isfinite(restored)))
            if nonfinite:
                raise SliceFailed(index, f"{nonfinite} restored voxels are NaN or infinite", nonfinite)
            return restored
        if kind == "failed":
            raise SliceFailed(*rest)
        if kind == "timeout":
            raise TimeoutError(f"no restored slice within {timeout} s")
        raise StreamEnded("stream finished: every result was popped")

    def finish(self) -> None:
        """No more slices: the last partial batch runs now. Calling it again does nothing."""
        self._impl.finish()

    def close(self) -> None:
        """Stop now: the running batch completes, results not popped are dropped. Idempotent."""
        self._impl.close()

    def __iter__(self):
        """Restored slices until the stream ends (after finish()); a failed slice raises SliceFailed.

        It waits in short steps, so that a signal handler (SIGINT, SIGTERM) runs promptly in the
        thread that iterates."""
        while True:
            try:
                yield self.pop(POLL_SECONDS)
            except TimeoutError:
                continue
            except StreamEnded:
                return

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_slabs_streaming(restorer, slabs, shape, axis: int, progress=None, batch_size: int | None = None,
                            nan_policy: str = "error") -> np.ndarray:
    """`Restorer.restore_slabs` through the runtime: a reader thread pushes slices as the file
    yields them while this thread collects restored slices, so file I/O overlaps compute.
    Every slice is accounted for: a failed slice or a read error raises, nothing is dropped.
    nan_policy is the runtime's (`Stream`), the same as `restore_file`'s."""
    import threading

    out = np.empty(shape, dtype=np.float32)
    out_slices = np.moveaxis(out, axis, 0)
    n = shape[axis]
    read_error: list[BaseException] = []
    with Stream(restorer, batch_size=batch_size or restorer.batch_size, nan_policy=nan_policy,
                shape=tuple(s for i, s in enumerate(shape) if i != axis)) as stream:

        def produce():
            try:
                for slab in slabs:
                    for s in slab:
                        stream.push(np.ascontiguousarray(s, dtype=np.float32))
            except BaseException as exc:  # reported by the consumer below
                read_error.append(exc)
            finally:
                try:
                    stream.finish()
                except StreamClosed:
                    pass

        reader = threading.Thread(target=produce, name="medir-fast-reader", daemon=True)
        reader.start()
        done = 0
        try:
            for restored in stream:
                out_slices[done] = restored
                done += 1
                if progress is not None:
                    progress(1)
        except SliceFailed as exc:
            if exc.nonfinite:  # as `io.stored_values` says it for the whole volume
                raise ValueError(f"slice {exc.index}: {exc.reason}; nothing was written") from exc
            raise
        finally:
            if done < n or read_error:
                stream.close()
            reader.join()
    if read_error:
        raise read_error[0]
    if done != n:
        raise RuntimeError(f"stream delivered {done} of {n} slices")
    return out
