"""Kernel tests run on the GPU when there is one, otherwise under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here. Every tensor the
wrappers allocate is poisoned (NaN, or -1 for integers) so an element a kernel fails to
write shows up as a failure instead of stale memory that happens to match.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.is_floating_point() else -1)


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def gpu_tiles(request, monkeypatch):
    """Kernel tests run the GPU's tile sizes under the interpreter too, so that tile
    boundaries (halos, partial tiles, split reductions) are exercised; whole-model runs
    (marked slow) keep the interpreter's large tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1" and request.node.get_closest_marker("slow") is None:
        from medir_fast.kernels import _common

        monkeypatch.setattr(_common, "INTERPRET_TILE_SCALE", 1)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole-model runs and the sm_90 compile check (tens of seconds on a CPU)")
