"""medir_fast.runtime.Stream (the C++ runtime through pybind11) against calling the Restorer directly,
and its behaviour under bad input and faults. Every wait has a timeout, so a hang fails instead of blocking."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from medir_fast.runtime import SliceFailed, Stream, StreamClosed, StreamEnded
from medir_fast.tasks import get_task

from .conftest import ct_slices

CT = get_task("ct_denoise")
# The stream and Restorer.restore_slices run the same float32 operations; only the batch
# composition differs, which changes nothing measurable on the CPU: 1e-6 of the range (~4 mHU).
ATOL = 1e-6 * (CT.hi - CT.lo)
WAIT = 30.0  # seconds; far above any legitimate wait here


class FakeRestorer:
    """A stand-in with the Restorer's streaming interface: y = 1 - x^2 in normalised space,
    optionally slow or failing from call `fail_at` on (counting calls from 0)."""

    def __init__(self, task=CT, delay: float = 0.0, fail_at: int | None = None, shape_bug: bool = False):
        self.task = task
        self.delay = delay
        self.fail_at = fail_at
        self.shape_bug = shape_bug
        self.calls = 0
        self.batch_sizes: list[int] = []

    def restore_normalized(self, batch: np.ndarray) -> np.ndarray:
        call, self.calls = self.calls, self.calls + 1
        self.batch_sizes.append(len(batch))
        assert batch.dtype == np.float32 and batch.ndim == 3
        if self.delay:
            time.sleep(self.delay * random.random())
        if self.fail_at is not None and call >= self.fail_at:
            raise RuntimeError("simulated device loss")
        out = 1.0 - batch * batch
        return out[:, :-1] if self.shape_bug else out

    def expected(self, x: np.ndarray) -> np.ndarray:
        n = self.task.normalize(x)
        return self.task.denormalize(1.0 - n * n)


def produce(stream: Stream, slices, finish: bool = True) -> threading.Thread:
    """Push from a producer thread (pushes block while the stream is full); errors are kept on the thread."""

    def body():
        try:
            for s in slices:
                stream.push(s)
            if finish:
                stream.finish()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            thread.error = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.error = None
    thread.start()
    return thread


def collect(stream: Stream) -> list:
    """Pop until the end: arrays, and SliceFailed for failed slices, in order."""
    out = []
    while True:
        try:
            out.append(stream.pop(timeout=WAIT))
        except SliceFailed as exc:
            out.append(exc)
        except StreamEnded:
            return out


def test_order_and_content_match_the_restorer(restorer):
    x = ct_slices(29, 32, 40, seed=1)  # 29: the last batch is partial
    with Stream(restorer, batch_size=4, queue_depth=8) as stream:  # fewer slots than slices: backpressure
        producer = produce(stream, x)
        out = collect(stream)
        producer.join(WAIT)
    assert producer.error is None
    assert len(out) == len(x) and all(isinstance(o, np.ndarray) for o in out)
    assert all(o.shape == (32, 40) and o.dtype == np.float32 for o in out)
    np.testing.assert_allclose(np.stack(out), restorer.restore_slices(x), rtol=0, atol=ATOL)


def test_strided_input_and_zero_copy_output():
    fake = FakeRestorer()
    base, wide = ct_slices(2, 32, 32, seed=2), ct_slices(1, 32, 64, seed=3)[0]
    views = [base[0].T, wide[:, ::2], base[1][::-1]]  # transposed, strided, negative stride
    with Stream(fake, batch_size=2) as stream:
        for v in views:
            assert stream.push(v)
        stream.finish()
        out = collect(stream)
    for o, v in zip(out, views):
        np.testing.assert_allclose(o, fake.expected(v), rtol=1e-6, atol=1e-3)
        assert not o.flags.owndata and o.flags.writeable and o.flags.c_contiguous  # owns the C++ buffer, no copy
    out[0][0, 0] = 1.0  # the array stays valid and usable after the stream is gone


def test_wrong_size_or_dtype_is_rejected_and_the_stream_goes_on():
    fake = FakeRestorer()
    x = ct_slices(3, 16, 24, seed=3)
    with Stream(fake, batch_size=2) as stream:
        assert stream.push(x[0])
        with pytest.raises(ValueError, match="16x20.*16x24"):
            stream.push(x[1][:, :20])
        with pytest.raises(ValueError, match="float32.*float64"):
            stream.push(x[1].astype(np.float64))
        with pytest.raises(ValueError, match="float32.*int16"):
            stream.push(x[1].astype(np.int16))
        with pytest.raises(ValueError, match="2-D"):
            stream.push(x[1:3])
        with pytest.raises(TypeError, match="numpy array"):
            stream.push(x[1].tolist())
        assert stream.push(x[1])
        assert stream.push(x[2])
        stream.finish()
        out = collect(stream)
    np.testing.assert_allclose(np.stack(out), fake.expected(x), rtol=1e-6, atol=1e-3)


def test_shape_given_up_front_rejects_the_first_wrong_slice():
    with Stream(FakeRestorer(), shape=(16, 16)) as stream:
        with pytest.raises(ValueError, match="16x24"):
            stream.push(ct_slices(1, 16, 24, seed=4)[0])


def test_nan_policy_error_rejects_the_slice():
    fake = FakeRestorer()
    x = ct_slices(2, 16, 16, seed=5)
    bad = x[0].copy()
    bad[3, 4], bad[5, 6] = np.nan, np.inf
    with Stream(fake, batch_size=2) as stream:
        with pytest.raises(ValueError, match="2 non-finite"):
            stream.push(bad)
        stream.push(x[0])
        stream.push(x[1])
        stream.finish()
        out = collect(stream)
    np.testing.assert_allclose(np.stack(out), fake.expected(x), rtol=1e-6, atol=1e-3)


class RecordingRestorer(FakeRestorer):
    """FakeRestorer that keeps every normalised batch the network was given."""

    def __init__(self, task=CT):
        super().__init__(task)
        self.seen: list[np.ndarray] = []

    def restore_normalized(self, batch: np.ndarray) -> np.ndarray:
        self.seen.append(batch.copy())
        return super().restore_normalized(batch)


@pytest.mark.parametrize("task", ["ct_denoise", "pet_synthesis"])
def test_nan_policy_zero_takes_nan_and_inf_as_zero_physical(task):
    """'zero' means what it means in restore_file: NaN, +Inf and -Inf are 0 in physical units
    before clip-and-scale, so the network sees (0 - lo) / (hi - lo) there (1024/4095 for CT, 0 for PET)."""
    t = get_task(task)
    fake = RecordingRestorer(t)
    bad = np.random.default_rng(6).uniform(t.lo - 0.1 * (t.hi - t.lo), t.hi * 1.1, (16, 16)).astype(np.float32)
    bad[0, :3] = [np.nan, np.inf, -np.inf]
    with Stream(fake, nan_policy="zero") as stream:
        stream.push(bad)
        stream.finish()
        (out,) = collect(stream)
    (seen,) = fake.seen
    zero = np.float32(0.0 - t.lo) / np.float32(t.hi - t.lo)
    assert seen[0, 0, :3].tolist() == [zero] * 3
    if task == "pet_synthesis":
        assert zero == 0.0
    else:
        assert zero == pytest.approx(1024 / 4095)
    np.testing.assert_array_equal(seen[0], t.normalize(np.nan_to_num(bad, nan=0.0, posinf=0.0, neginf=0.0)))
    want = fake.expected(np.nan_to_num(bad, nan=0.0, posinf=0.0, neginf=0.0))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * (t.hi - t.lo))
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="nan_policy"):
        Stream(fake, nan_policy="replace")  # the runtime's old name for a different policy is gone


def test_nan_policy_names_are_the_api_ones():
    from medir_fast import runtime
    from medir_fast.io import NAN_POLICIES

    assert runtime.NAN_POLICIES is NAN_POLICIES == ("error", "zero")
    for policy in NAN_POLICIES:
        Stream(FakeRestorer(), nan_policy=policy).close()


def test_restore_file_nan_zero_same_with_and_without_stream(tmp_path, tiny_model, restorer):
    """The two layers agree: restore_file(nan_policy='zero') gives the same volume through the
    streaming runtime (which applies the policy itself to the raw slices) as through
    Restorer.restore_slabs, on a float32 CT volume with NaN and +-Inf; and so does a Stream of
    the raw slices."""
    import nibabel as nib

    from medir_fast.api import restore_file

    from ..conftest import write_nifti

    hu = np.random.default_rng(9).normal(40, 300, (23, 29, 4)).clip(-1024, 3000).astype(np.float32)
    hu[3, 4, 0], hu[10, 11, 1], hu[0, 0, 2], hu[22, 28, 3] = np.nan, np.inf, -np.inf, np.nan
    hu[5:8, 5:8, 3] = np.nan  # a small NaN patch too
    src = write_nifti(tmp_path / "nan.nii.gz", hu)
    kwargs = dict(model=tiny_model, nan_policy="zero", batch_size=2, backend="eager", device="cpu", precision="fp32")
    plain = nib.load(restore_file(src, tmp_path / "a.nii.gz", "ct_denoise", **kwargs)).get_fdata()
    streamed = nib.load(restore_file(src, tmp_path / "b.nii.gz", "ct_denoise", stream=True, **kwargs)).get_fdata()
    assert np.isfinite(plain).all() and np.isfinite(streamed).all()
    np.testing.assert_allclose(streamed, plain, rtol=1e-5, atol=1e-2)
    with Stream(restorer, batch_size=2, nan_policy="zero") as stream:
        for k in range(hu.shape[2]):
            stream.push(np.ascontiguousarray(hu[:, :, k]))
        stream.finish()
        raw = np.stack(collect(stream), axis=2)
    np.testing.assert_allclose(raw, plain, rtol=1e-5, atol=1e-2)


def test_backend_failure_on_batch_k():
    """Batch 2 raises: slices 0..7 delivered, every later accepted slice reported failed with the reason."""
    fake = FakeRestorer(fail_at=2)
    x = ct_slices(40, 16, 16, seed=7)
    stream = Stream(fake, batch_size=4, queue_depth=8, max_wait=60.0)  # batches form only when full
    producer = produce(stream, x)
    out = collect(stream)
    producer.join(WAIT)
    assert not producer.is_alive()
    assert isinstance(producer.error, StreamClosed) and "simulated device loss" in str(producer.error)
    assert len(out) >= 12  # the failed batch, plus whatever was queued behind it
    np.testing.assert_allclose(np.stack(out[:8]), fake.expected(x[:8]), rtol=1e-6, atol=1e-3)
    for i, failure in enumerate(out[8:], start=8):
        assert isinstance(failure, SliceFailed) and failure.index == i
        assert "batch 2" in failure.reason and "RuntimeError: simulated device loss" in failure.reason
    with pytest.raises(StreamClosed, match="simulated device loss"):
        stream.push(x[0])
    with pytest.raises(StreamEnded):
        stream.pop(timeout=WAIT)
    stream.close()
    assert fake.calls == 3  # nothing ran after the failure


def test_a_restorer_returning_the_wrong_shape_fails_its_slices():
    with Stream(FakeRestorer(shape_bug=True), batch_size=2) as stream:
        stream.push(ct_slices(1, 16, 16, seed=8)[0])
        stream.finish()
        (failure,) = collect(stream)
    assert isinstance(failure, SliceFailed) and "returned shape (1, 15, 16), expected (1, 16, 16)" in failure.reason


def test_finish_twice_push_after_finish_pop_after_end():
    fake = FakeRestorer()
    x = ct_slices(3, 16, 16, seed=9)
    with Stream(fake, batch_size=2) as stream:
        for s in x:
            stream.push(s)
        stream.finish()
        stream.finish()
        with pytest.raises(StreamClosed, match="after finish"):
            stream.push(x[0])
        assert len(list(stream)) == 3
        for _ in range(2):
            with pytest.raises(StreamEnded):
                stream.pop(timeout=WAIT)
    stream.close()  # after the with block: still harmless
    with pytest.raises(StreamClosed):
        stream.push(x[0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch size"),
    (dict(batch_size=8, queue_depth=4), "queue depth"),
    (dict(max_wait=-1.0), "max_wait"),
    (dict(shape=(16, 0)), "slice size"),
])
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Stream(FakeRestorer(), **kwargs)


def test_pop_timeout_and_partial_batch_after_max_wait():
    with Stream(FakeRestorer(), batch_size=8, max_wait=0.05) as stream:
        with pytest.raises(TimeoutError):
            stream.pop(timeout=0.01)
        start = time.perf_counter()
        stream.push(ct_slices(1, 16, 16, seed=10)[0])
        stream.pop(timeout=WAIT)  # one slice of a batch of 8, no finish(): it runs after max_wait
        assert time.perf_counter() - start >= 0.05


def test_non_blocking_push_reports_a_full_stream():
    x = ct_slices(3, 16, 16, seed=11)
    with Stream(FakeRestorer(), batch_size=2, queue_depth=2, block=False) as stream:
        assert stream.push(x[0]) and stream.push(x[1])
        assert stream.push(x[2]) is False
        stream.pop(timeout=WAIT)
        assert stream.push(x[2])


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counting threads needs Linux /proc")
def test_destruction_with_slices_in_flight_joins_the_worker():
    """In a fresh process, so that no other test's threads (thread pools of torch or ONNX Runtime,
    started or ended meanwhile) change the count."""
    code = """
import gc
from tests.runtime.test_stream import FakeRestorer, Stream, _thread_count, ct_slices
import time
x = ct_slices(8, 16, 16, seed=12)
with Stream(FakeRestorer(delay=0.02), batch_size=2) as stream:  # whatever a first stream starts once
    for s in x:
        stream.push(s)
gc.collect()
before = _thread_count()
for _ in range(3):
    stream = Stream(FakeRestorer(delay=0.02), batch_size=2, queue_depth=8)
    for s in x:
        stream.push(s)
    del stream  # nothing popped, a batch running in Python on the worker thread
    gc.collect()
with Stream(FakeRestorer(delay=0.02), batch_size=2) as stream:  # leaving the block closes it
    for s in x:
        stream.push(s)
deadline = time.monotonic() + 5
while _thread_count() > before and time.monotonic() < deadline:  # a thread the OS reaps a moment later
    time.sleep(0.05)
print(before, _thread_count())
"""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split()[-2:])
    assert after <= before, proc.stdout  # every worker joined


def test_close_releases_a_blocked_producer_and_consumer():
    stream = Stream(FakeRestorer(delay=0.2), batch_size=1, queue_depth=1)
    x = ct_slices(3, 16, 16, seed=13)
    producer = produce(stream, x, finish=False)  # blocks on the second push
    results = []
    consumer = threading.Thread(target=lambda: results.extend(collect(stream)), daemon=True)
    consumer.start()
    time.sleep(0.05)
    stream.close()
    producer.join(WAIT)
    consumer.join(WAIT)
    assert not producer.is_alive() and not consumer.is_alive()
    assert isinstance(producer.error, StreamClosed) or producer.error is None


def test_stress_thousands_of_small_slices_with_random_delays():
    rng = random.Random(14)
    fake = FakeRestorer(delay=0.0005)
    x = ct_slices(3000, 16, 16, seed=14)

    def producer():
        for s in x:
            if rng.random() < 0.05:
                time.sleep(rng.random() * 0.002)
            stream.push(s)
        stream.finish()

    with Stream(fake, batch_size=8, queue_depth=24, max_wait=0.0005) as stream:
        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        out = []
        crng = random.Random(15)
        while True:
            if crng.random() < 0.05:
                time.sleep(crng.random() * 0.002)
            try:
                out.append(stream.pop(timeout=WAIT))
            except StreamEnded:
                break
        thread.join(WAIT)
    assert len(out) == len(x)
    np.testing.assert_allclose(np.stack(out), fake.expected(x), rtol=1e-6, atol=1e-3)
    assert sum(fake.batch_sizes) == len(x) and max(fake.batch_sizes) <= 8


def test_interpreter_exit_with_an_open_stream_is_clean(tmp_path):
    """Exit while the worker is inside restore_normalized and slices wait: no crash, no hang."""
    script = tmp_path / "exit_open.py"
    script.write_text(
        "import time, numpy as np\n"
        "from medir_fast.runtime import Stream\n"
        "from medir_fast.tasks import get_task\n"
        "class Slow:\n"
        "    task = get_task('ct_denoise')\n"
        "    def restore_normalized(self, b):\n"
        "        time.sleep(0.2)\n"
        "        return b\n"
        "stream = Stream(Slow(), batch_size=1, queue_depth=8)\n"
        "for _ in range(5):\n"
        "    stream.push(np.zeros((16, 16), np.float32))\n"
        "time.sleep(0.05)\n"
        "print('exiting')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr
