"""SIGINT, SIGTERM and SIGHUP sent to a real `medir-fast infer` run at several moments: exit
128 + signal, one line, no temporary or partial file, the input untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import DATA, write_nifti

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads signal dispositions from /proc (Linux)")

WAIT = 120.0  # seconds; far above any legitimate wait here


def from_a_terminal(cmd: list[str], ignored: tuple[signal.Signals, ...] = ()) -> list[str]:
    """`cmd` started with SIGHUP, SIGINT and SIGTERM at their defaults, as from a terminal, whatever
    this process inherited (a runner started under nohup or as a background job ignores some, and
    the CLI keeps an ignored signal ignored); those in `ignored` are ignored, as nohup does."""
    setup = ("import os, signal, sys\n"
             "for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):\n"
             f"    signal.signal(s, signal.SIG_IGN if s in {[int(s) for s in ignored]} else signal.SIG_DFL)\n"
             "os.execv(sys.argv[1], sys.argv[1:])\n")
    return [sys.executable, "-c", setup, *cmd]


def _catches_our_signals(pid: int, signals=(signal.SIGHUP, signal.SIGINT, signal.SIGTERM)) -> bool:
    """Whether the process has installed its handlers (SigCgt holds each of `signals`)."""
    return _signal_mask(pid, "SigCgt", signals)


def _signal_mask(pid: int, field: str, signals) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")), 16)
    return all(mask >> (s - 1) & 1 for s in signals)


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {WAIT} s")
        time.sleep(0.005)


def _partial(folder: Path) -> bool:
    """A temporary output being written (not the empty probe made while checking the path)."""
    return any(p.name.startswith(".") and ".partial" in p.name and p.stat().st_size > 0
               for p in folder.iterdir() if p.exists())


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A 256 x 256 x 24 CT-like volume: a few seconds of compute and a gzip write long enough
    to be caught in the act, with the tiny golden model."""
    folder = tmp_path_factory.mktemp("signals")
    rng = np.random.default_rng(0)
    return write_nifti(folder / "ct.nii.gz", rng.normal(40, 300, (256, 256, 24)).astype(np.float32))


MOMENTS = {
    "starting": lambda folder, proc: None,  # handlers in place, PyTorch and the model still loading
    "computing": lambda folder, proc: time.sleep(4.0),
    "writing": lambda folder, proc: _wait_for(lambda: _partial(folder), proc, "temporary output being written"),
}


@pytest.mark.parametrize("sig,moment,stream", [
    (signal.SIGTERM, "starting", False),
    (signal.SIGTERM, "computing", False),
    (signal.SIGTERM, "writing", False),
    (signal.SIGINT, "computing", True),
    (signal.SIGINT, "writing", False),
    (signal.SIGHUP, "writing", False),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else ("stream" if v is True else None if v is False else v))
def test_signal_leaves_nothing_behind(tmp_path, volume, sig, moment, stream):
    src = tmp_path / volume.name
    src.write_bytes(volume.read_bytes())
    original = src.read_bytes()
    cmd = [sys.executable, "-m", "medir_fast.cli", "infer", str(src), "--task", "ct_denoise", "--weights",
           str(DATA / "tiny_state_dict.pth"), "-o", str(tmp_path / "out.nii.gz"), "--preview", str(tmp_path / "p.png"),
           "--batch-size", "2", *(["--stream"] if stream else [])]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(from_a_terminal(cmd), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(lambda: _catches_our_signals(proc.pid), proc, "signal handlers")
        MOMENTS[moment](tmp_path, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig, err
    assert len(lines) == 1 and f"interrupted by {sig.name}" in lines[0], err
    assert src.read_bytes() == original
    if "after writing" in lines[0]:  # it came while the finished files were being renamed: all complete
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "out.nii.gz", "p.png"]
        assert np.isfinite(nib.load(tmp_path / "out.nii.gz").get_fdata()).all()
    else:
        assert "nothing was written" in lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_a_run_under_nohup_outlives_sighup(tmp_path, volume):
    """A signal ignored when the run starts stays ignored: `nohup medir-fast infer ...` finishes
    after the terminal closes, whole."""
    out = tmp_path / "out.nii.gz"
    cmd = [sys.executable, "-m", "medir_fast.cli", "infer", str(volume), "--task", "ct_denoise", "--weights",
           str(DATA / "tiny_state_dict.pth"), "-o", str(out), "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(from_a_terminal(cmd, ignored=(signal.SIGHUP,)), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        _wait_for(lambda: _catches_our_signals(proc.pid, (signal.SIGINT, signal.SIGTERM)), proc, "signal handlers")
        assert _signal_mask(proc.pid, "SigIgn", (signal.SIGHUP,)) and not _catches_our_signals(proc.pid, (signal.SIGHUP,))
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert np.isfinite(nib.load(out).get_fdata()).all()


def _series_being_written(folder: Path) -> bool:
    """A temporary series folder that already holds a file."""
    try:
        return any(p.is_dir() and ".partial" in p.name and any(p.iterdir()) for p in folder.iterdir())
    except OSError:  # renamed or removed while looking
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_a_dicom_series_is_written_leaves_no_folder(tmp_path, volume, sig):
    from .dicom_series import write_series

    image = nib.load(volume)
    hu = np.concatenate([np.asarray(image.dataobj)] * 2, axis=2).clip(-1024, 3000).round()  # 48 slices: a write
    write_series(tmp_path / "in", hu, image.affine, "CT")                                 # long enough to catch
    before = {p: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    cmd = [sys.executable, "-m", "medir_fast.cli", "infer", str(tmp_path / "in"), "--task", "ct_denoise", "--weights",
           str(DATA / "tiny_state_dict.pth"), "-o", str(tmp_path / "out"), "--batch-size", "8"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(from_a_terminal(cmd), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(lambda: _catches_our_signals(proc.pid), proc, "signal handlers")
        _wait_for(lambda: _series_being_written(tmp_path), proc, "temporary series being written")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig and len(lines) == 1 and f"interrupted by {sig.name}" in lines[0], err
    assert {p: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    if "after writing" in lines[0]:  # it came while the finished folder was being renamed: complete
        assert len(list((tmp_path / "out").iterdir())) == hu.shape[2]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
