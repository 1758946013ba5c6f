"""Inference backends: one small interface, one module per backend.

A backend runs the network on a batch that is already normalised and padded:
`run(batch [B, 1, H, W] float32 in [0, 1], H and W multiples of 8) -> [B, 1, H, W] float32`.
It knows nothing of files, tasks, tiling or intensity units (the Restorer owns those).
A backend that cannot run says why (`unavailable_reason`); nothing falls back silently.
"""

from __future__ import annotations

import importlib
import logging
from typing import Protocol

import torch


log = logging.getLogger("medir_fast")


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype

    def run(self, batch: torch.Tensor) -> torch.Tensor: ...


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


# name -> module; each module has `unavailable_reason(device, dtype) -> str | None` and `make(model, device, dtype)`,
# and may have `model_reason(model) -> str | None` (a model it cannot run).
BACKENDS = {"eager": "medir_fast.backends.eager", "triton": "medir_fast.backends.triton",
            "onnxruntime": "medir_fast.backends.onnxruntime"}
# 'auto' tries these in order (Triton's CPU interpreter is for tests, not use). On the CPU ONNX Runtime
# runs the shipped model 2.1x faster than eager (benchmarks/RESULTS.md); its engine is exported on
# a model's first use (about half a minute) and cached.
AUTO_ORDER = {"cuda": ("triton", "eager"), "cpu": ("onnxruntime", "eager")}


def _module(name: str):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {exc}") from exc


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, model=None) -> str | None:
    """Why backend `name` cannot run here (None: it can); with `model`, also why not that model."""
    try:
        module = _module(name)
    except BackendUnavailable as exc:
        return str(exc)
    reason = module.unavailable_reason(device, dtype)
    if reason is None and model is not None and hasattr(module, "model_reason"):
        reason = module.model_reason(model)
    return reason


def make_backend(name: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 engine=None) -> Backend:
    """Build backend `name` ('auto' picks the first available of AUTO_ORDER for the device).
    engine: an engine file to run (ONNX, for 'onnxruntime'), checked against the model."""
    if engine is not None:
        if name not in ("auto", "onnxruntime"):
            raise BackendUnavailable(f"an engine file runs with the onnxruntime backend, not {name!r}")
        name = "onnxruntime"
    if name == "auto":
        for name in AUTO_ORDER[device.type]:
            reason = unavailable_reason(name, device, dtype, model)
            if reason is None:
                break
            log.info("auto: skipping backend %s (%s)", name, reason)
    reason = unavailable_reason(name, device, dtype, model)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} unavailable: {reason}")
    if engine is not None:
        return _module(name).make(model, device, dtype, engine=engine)
    return _module(name).make(model, device, dtype)
