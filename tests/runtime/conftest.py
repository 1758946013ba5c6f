"""Fixtures for the streaming runtime: a CPU Restorer on the tiny golden AMIR, the CMake
build of csrc/ (library, C++ tests, example host) and one AOTInductor package shared by
every test that needs it (compiling it takes one to two minutes on a 2-core CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medir_fast.restorer import Restorer

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
DATA = ROOT / "tests" / "data"


def run_checked(cmd: list, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run a build step; on failure show its output's tail in the test report."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def build_tools_missing() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed: the C++ runtime's CMake build cannot run"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX) found: the C++ runtime cannot be built"
    return None


def cmake_build(build_dir: Path, *options: str) -> Path:
    reason = build_tools_missing()
    if reason:
        pytest.skip(reason)
    run_checked(["cmake", "-S", CSRC, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", *options])
    run_checked(["cmake", "--build", build_dir, "-j2"])
    return build_dir


@pytest.fixture(scope="session")
def csrc_build(tmp_path_factory) -> Path:
    """csrc/ built with the AOTInductor backend and the example host, against the torch wheel's libtorch."""
    return cmake_build(tmp_path_factory.mktemp("csrc"), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")


@pytest.fixture(scope="session")
def restorer(tiny_model) -> Restorer:
    return Restorer(tiny_model, "ct_denoise", backend="eager", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def aoti_package(tmp_path_factory, tiny_weights) -> Path:
    """The tiny golden AMIR exported through the `medir-fast export --format aoti` entry point."""
    from medir_fast.cli import main

    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    start = time.perf_counter()
    assert main(["export", "--weights", str(tiny_weights), "-o", str(path), "--max-shape", "16x256x256"]) == 0
    print(f"\nAOTInductor export of the tiny AMIR: {time.perf_counter() - start:.0f} s")
    return path


def ct_slices(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Random CT-like slices in HU reaching past both ends of the ct_denoise range (clipping is exercised)."""
    return np.random.default_rng(seed).uniform(-1300, 3400, (n, h, w)).astype(np.float32)
