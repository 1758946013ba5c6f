"""Engines built on a model's first use and kept for the next run.

Under `$MEDIR_FAST_CACHE/engines` (default `~/.cache/medir-fast/engines`), one file per key: a
hash of the weights, the config, the format, precision and shape profile, the device it is
compiled for, the exporting code and the library versions. A second run with the same model
starts in seconds. A cached file whose metadata does not fit the model is built again, never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .metadata import EngineError, compiled_for, device_reason, fits, library_versions, read_metadata, weights_sha256
from .profile import ShapeProfile

log = logging.getLogger("medir_fast")

# how long a first build takes, for the log line (measured on the 2-core development CPU)
BUILD_TIME = {"onnx": "about half a minute", "aoti": "minutes", "tensorrt": "minutes"}


def engine_folder() -> Path:
    return Path(os.environ.get("MEDIR_FAST_CACHE", Path.home() / ".cache" / "medir-fast")) / "engines"


def engine_key(model: torch.nn.Module, fmt: str, precision: str, profile: ShapeProfile, device: torch.device) -> str:
    from .. import __version__

    code = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")) + [Path(__file__).parents[1] / "model" / "amir.py"]:
        code.update(source.read_bytes())
    parts = dict(weights=weights_sha256(model), config=model.config, format=fmt, precision=precision,
                 profile=profile.as_dict(), device="any" if fmt == "onnx" else compiled_for(device),
                 code=code.hexdigest(),
                 versions=[__version__, library_versions(fmt)])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def engine_path(model: torch.nn.Module, fmt: str, precision: str, profile: ShapeProfile, device: torch.device) -> Path:
    """Where the cache keeps this engine."""
    from . import FORMATS

    return engine_folder() / f"amir-{fmt}-{engine_key(model, fmt, precision, profile, device)}{FORMATS[fmt].suffix}"


def cached_engine(model: torch.nn.Module, fmt: str, precision: str, profile: ShapeProfile,
                  device: torch.device) -> Path:
    """The engine of `model`: from the cache when it is there and fits, else built now."""
    from ..outputs import OutputError, write_atomically
    from . import export

    path = engine_path(model, fmt, precision, profile, device)
    reason = _reason(path, model, fmt, precision, device) if path.is_file() else None
    if path.is_file() and reason is None:
        return path
    if reason is not None:
        log.warning("cached engine %s is %s; building it again", path, reason)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the engine cache {path.parent} ({exc.strerror}); set MEDIR_FAST_CACHE") from exc
    log.info("building the %s %s engine of this model (once per model, %s; cached at %s)",
             precision, fmt, BUILD_TIME[fmt], path)
    try:
        write_atomically(path, lambda tmp: export(model, tmp, fmt, precision=precision, profile=profile,
                                                  device="cpu" if fmt == "onnx" else device), "engine")
    except OutputError:  # another process cached it meanwhile
        if _reason(path, model, fmt, precision, device) is not None:
            raise
    return path


def _reason(path: Path, model: torch.nn.Module, fmt: str, precision: str, device: torch.device) -> str | None:
    try:
        meta = read_metadata(path)
        return fits(meta, model, fmt, precision) or device_reason(meta, device)
    except EngineError as exc:
        return str(exc)
