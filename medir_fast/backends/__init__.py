"""Inference backends: one small interface, one module per backend.

A backend runs the network on a batch that is already normalised and padded:
`run(batch [B, 1, H, W] float32 in [0, 1], H and W multiples of 8) -> [B, 1, H, W] float32`.
It knows nothing of files, tasks, tiling or intensity units (the Restorer owns those).
A backend that cannot run says why (`unavailable_reason`); nothing falls back silently.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
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


# name -> module; each module has `unavailable_reason(device, dtype) -> str | None` and
# `make(model, device, dtype[, engine])`, and may have `model_reason(model) -> str | None` (a model it cannot run).
BACKENDS = {"eager": "medir_fast.backends.eager", "triton": "medir_fast.backends.triton",
            "onnxruntime": "medir_fast.backends.onnxruntime", "aoti": "medir_fast.backends.aoti",
            "tensorrt": "medir_fast.backends.tensorrt"}
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
    engine: an engine file to run (.onnx, .pt2, .engine), by the backend of its format, checked
    against the model."""
    if engine is not None:
        from ..export import FORMATS, SUFFIXES

        if Path(engine).suffix not in SUFFIXES:
            raise BackendUnavailable(f"{engine}: an engine file ends in {', '.join(SUFFIXES)}")
        runs = FORMATS[SUFFIXES[Path(engine).suffix]].backend
        if name not in ("auto", runs):
            raise BackendUnavailable(f"{Path(engine).name} runs with the {runs} backend, not {name!r}")
        name = runs
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


def amir_only(model: torch.nn.Module) -> str | None:
    """Engines are built for AMIR models (their config goes into the engine's metadata)."""
    return None if isinstance(getattr(model, "config", None), dict) else "it runs AMIR models only"


class EngineBackend:
    """A backend that runs an engine file (`medir_fast.export`): the one given, after checking
    that its metadata fits the model, the precision and the device, or the model's own, built on
    first use and cached. Batches run within the engine's shape profile: in chunks of at most its
    largest batch, each padded up to its smallest; slices outside it are refused (EngineError),
    never a crash inside the engine."""

    name: str
    format: str  # of medir_fast.export.FORMATS

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None):
        from ..export import FORMATS
        from ..export.cache import cached_engine
        from ..export.metadata import EngineError, device_reason, fits, read_metadata, settings
        from ..export.profile import ShapeProfile
        from ..restorer import precision_name

        self.device, self.dtype = device, dtype
        precision = precision_name(dtype)
        if engine is None:
            reason = self.build_reason()
            if reason is not None:
                raise BackendUnavailable(f"backend {self.name!r} cannot build an engine here: {reason}")
        path = Path(engine) if engine is not None else cached_engine(
            model, self.format, precision, FORMATS[self.format].profile, device)
        meta = read_metadata(path)
        reason = fits(meta, model, self.format, precision) or device_reason(meta, device) or self.runtime_reason(meta)
        if reason is not None:
            raise EngineError(f"engine {path} cannot run this model: {reason}")
        self.engine = path
        self.profile = ShapeProfile.from_dict(settings(meta)["profile"])
        self.load(path)

    def build_reason(self) -> str | None:
        """Why this backend cannot build an engine here (None: it can); running a given one may
        still work."""
        return None

    def runtime_reason(self, meta: dict[str, str]) -> str | None:
        """Why the engine cannot run with the runtime installed here (None: it can)."""
        return None

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def run_chunk(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        from ..export.metadata import EngineError

        reason = self.profile.reason(*batch.shape[-2:])
        if reason is not None:
            raise EngineError(f"{reason}; run in tiles that fit (--tile), or export an engine with a wider profile")
        batch = batch.detach().to(torch.float32)
        smallest = self.profile.min[0]
        parts = []
        for part in self.profile.chunks(len(batch)):
            chunk = batch[part]
            short = smallest - len(chunk)
            if short > 0:  # repeat the last slice up to the engine's smallest batch; drop those outputs
                chunk = torch.cat([chunk, chunk[-1:].expand(short, *chunk.shape[1:])])
            parts.append(self.run_chunk(chunk.contiguous())[:len(batch[part])])
        return parts[0] if len(parts) == 1 else torch.cat(parts)
