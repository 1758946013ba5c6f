"""The C++ side: its own tests through ctest (plain and under sanitizers), and the example host
streaming a raw volume through an AOTInductor package, compared with the Python Restorer."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from .conftest import cmake_build, ct_slices, run_checked


def test_ctest(csrc_build):
    proc = run_checked(["ctest", "--test-dir", csrc_build, "--output-on-failure"], timeout=300)
    assert "100% tests passed" in proc.stdout


@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_ctest_under_sanitizers(tmp_path, sanitizer):
    """The core and its tests (no libtorch) with ASan+UBSan, then TSan: any report fails the run."""
    build = cmake_build(tmp_path, "-DMEDIR_FAST_AOTI=OFF", f"-DMEDIR_FAST_SANITIZE={sanitizer}",
                        "-DCMAKE_BUILD_TYPE=RelWithDebInfo")
    env = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
           "TSAN_OPTIONS": "halt_on_error=1"}
    proc = run_checked(["ctest", "--test-dir", build, "--output-on-failure"], timeout=300,
                       env={**os.environ, **env})
    assert "100% tests passed" in proc.stdout


def run_example(build, *args) -> subprocess.CompletedProcess:
    return subprocess.run([build / "stream_volume", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("shape,batch", [((5, 48, 64), 2), ((7, 44, 60), 3)])  # 44x60: reflect-padded to 48x64
def test_example_host_matches_the_python_restorer(csrc_build, aoti_package, restorer, tmp_path, shape, batch):
    volume = ct_slices(*shape, seed=sum(shape))
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    volume.tofile(src)
    task = restorer.task
    proc = run_example(csrc_build, aoti_package, src, dst, *shape, task.lo, task.hi, batch)
    assert proc.returncode == 0, proc.stderr
    assert f"restored {shape[0]} slices" in proc.stdout
    out = np.fromfile(dst, dtype=np.float32).reshape(shape)
    # AOTInductor's fused kernels round differently from eager PyTorch: 1e-5 of the range (~0.04 HU).
    np.testing.assert_allclose(out, restorer.restore_slices(volume), rtol=0, atol=1e-5 * (task.hi - task.lo))


def test_example_host_bad_input_is_one_line_and_leaves_no_output(csrc_build, aoti_package, tmp_path):
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    ct_slices(2, 32, 32, seed=0).tofile(src)
    cases = [
        ((tmp_path / "missing.pt2", src, dst, 2, 32, 32, -1024, 3071), "not found"),
        ((src, src, dst, 2, 32, 32, -1024, 3071), "cannot load AOTInductor package"),
        ((aoti_package, src, dst, 3, 32, 32, -1024, 3071), "expected 12288"),
        ((aoti_package, src, dst, 2, 32, 32, 5, -5), "lo < hi"),
        ((aoti_package, src, dst, 2, "x", 32, -1024, 3071), "HEIGHT must be a positive integer"),
        ((aoti_package, src, dst, 8, 8, 32, -1024, 3071), "too small"),
    ]
    for args, message in cases:
        proc = run_example(csrc_build, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
        assert not dst.exists() and not (tmp_path / "out.raw.partial").exists()

