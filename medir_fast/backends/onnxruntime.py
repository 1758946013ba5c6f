"""The `onnxruntime` backend: the model exported to ONNX (`medir_fast.export.onnx`) and run by
ONNX Runtime (its CPU provider; the CUDA provider where it is installed).

The engine is exported on first use and cached under `$MEDIR_FAST_CACHE/engines` (default
`~/.cache/medir-fast/engines`), keyed by the weights' sha256, the config, the precision, the
shape profile and the library versions: a second run with the same model starts in seconds.
A cached file whose metadata does not fit the model is rebuilt, never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from . import BackendUnavailable

log = logging.getLogger("medir_fast")

MAX_BATCH = 64
MAX_SIDE = 4096


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (what PyTorch's exporter translates with)
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install onnx onnxscript onnxruntime)"
    if dtype != torch.float32:
        return "only float32 ONNX engines are built so far (use --precision fp32)"
    if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    if device.type not in ("cpu", "cuda"):
        return f"no ONNX Runtime provider for {device.type}"
    return None


def model_reason(model: torch.nn.Module) -> str | None:
    """Engines are built for AMIR models (their config goes into the engine's metadata)."""
    return None if isinstance(getattr(model, "config", None), dict) else "it runs AMIR models only"


def engine_folder() -> Path:
    return Path(os.environ.get("MEDIR_FAST_CACHE", Path.home() / ".cache" / "medir-fast")) / "engines"


def engine_key(model: torch.nn.Module, settings: dict) -> str:
    """What an engine depends on, hashed: weights, config, precision and shape profile, versions."""
    import onnx
    import onnxruntime

    from .. import __version__
    from ..export.onnx import FORMAT, weights_sha256

    from ..export import onnx as exporter
    from ..model import amir

    code = hashlib.sha256(Path(amir.__file__).read_bytes() + Path(exporter.__file__).read_bytes()).hexdigest()
    parts = dict(format=FORMAT, weights=weights_sha256(model), config=model.config, settings=settings, code=code,
                 versions=[__version__, torch.__version__, onnx.__version__, onnxruntime.__version__])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def fits(path: Path, model: torch.nn.Module) -> str | None:
    """Why the engine file at `path` cannot run `model` (None: it can)."""
    from ..export.onnx import FORMAT, read_metadata, weights_sha256

    try:
        meta = read_metadata(path)
    except ImportError:
        raise
    except Exception as exc:  # onnx raises several types for a damaged file
        return f"unreadable ({type(exc).__name__})"
    if meta.get("medir_fast.format") != FORMAT or "medir_fast.export" not in meta:
        return "not a medir-fast ONNX engine"
    if json.loads(meta.get("medir_fast.config", "null")) != json.loads(json.dumps(model.config)):
        return "built for another AMIR config"
    if meta.get("medir_fast.weights_sha256") != weights_sha256(model):
        return "built from other weights"
    return None


def cached_engine(model: torch.nn.Module) -> Path:
    """The ONNX engine of `model`: from the cache when it is there and fits, else exported now."""
    from ..export.onnx import export_onnx
    from ..outputs import OutputError, write_atomically

    settings = dict(precision="fp32", max_batch=MAX_BATCH, max_side=MAX_SIDE)
    path = engine_folder() / f"amir-{engine_key(model, settings)}.onnx"
    if path.is_file():
        reason = fits(path, model)
        if reason is None:
            return path
        log.warning("cached engine %s is %s; building it again", path, reason)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the engine cache {path.parent} ({exc.strerror}); set MEDIR_FAST_CACHE") from exc
    log.info("exporting the model to ONNX for onnxruntime (once per model; cached at %s)", path)
    try:
        write_atomically(path, lambda tmp: export_onnx(model, tmp, max_batch=MAX_BATCH, max_side=MAX_SIDE), "engine")
    except OutputError:  # another process cached it meanwhile
        if fits(path, model) is not None:
            raise
    return path


class EngineError(ValueError):
    """An engine file that cannot run the model asked for; the message is meant for the user."""


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None):
        import onnxruntime

        from ..export.onnx import read_metadata

        self.device = device
        self.dtype = dtype
        if engine is not None:
            reason = fits(Path(engine), model) if Path(engine).is_file() else "not found"
            if reason is not None:
                raise EngineError(f"engine {engine} cannot run this model: {reason}")
        self.engine = Path(engine) if engine is not None else cached_engine(model)
        profile = json.loads(read_metadata(self.engine)["medir_fast.export"])
        self.max_batch, self.max_side = profile["max_batch"], profile["max_side"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        cuda = [("CUDAExecutionProvider", {"device_id": device.index or 0})] if device.type == "cuda" else []
        self.session = onnxruntime.InferenceSession(str(self.engine), options,
                                                    providers=[*cuda, "CPUExecutionProvider"])
        if cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailable("onnxruntime could not load its CUDA provider here (see its log); "
                                     "use --device cpu or another backend")

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Batches larger than the engine's profile (many tiles) run in chunks of its largest."""
        if max(batch.shape[-2:]) > self.max_side:
            raise EngineError(f"slices of {batch.shape[-2]}x{batch.shape[-1]} are outside the engine's profile "
                              f"(sides <= {self.max_side}); use --tile")
        image = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        chunks = [self.session.run(["restored"], {"image": image[i:i + self.max_batch]})[0]
                  for i in range(0, len(image), self.max_batch)]
        return torch.from_numpy(chunks[0] if len(chunks) == 1 else np.concatenate(chunks))


def make(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(model, device, dtype, engine)
