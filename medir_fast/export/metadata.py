"""What an engine file was built from, written into the file and read back without running it.

Every engine records the same keys (`describe`): its format, the AMIR config, the weights'
sha256, the task ranges and the weights' default tiles, the medir-fast and library versions,
and the export settings (precision, shape profile, ...). ONNX keeps them as model properties,
an AOTInductor package in its compiled-in metadata (a JSON file in the archive), a TensorRT
engine in the header of our container (`medir_fast.export.tensorrt`). A backend runs a file only
when `fits` finds nothing against the model it was asked to run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import torch

PREFIX = "medir_fast."


class EngineError(ValueError):
    """An engine file that cannot be read or cannot run the model asked for; meant for the user."""


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def format_tag(fmt: str) -> str:
    return f"medir-fast {fmt} 2"


def compiled_for(device: torch.device) -> dict[str, str]:
    """What compiled code (an AOTInductor package, a TensorRT plan) is tied to: on the CPU the
    vector instruction set Inductor generated for, on CUDA the GPU model and compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"type": device.type, "isa": str(pick_vec_isa()) or "none"}


def describe_device(device: dict) -> str:
    """{'type': 'cpu', 'isa': 'avx2'} -> 'cpu (avx2)'."""
    rest = [str(v) for k, v in sorted(device.items()) if k != "type"]
    return str(device.get("type", "an unknown device")) + (f" ({', '.join(rest)})" if rest else "")


def describe(model: torch.nn.Module, fmt: str, settings: dict) -> dict[str, str]:
    """The metadata of an engine of `model` in format `fmt` exported with `settings`."""
    from .. import __version__
    from ..tasks import TASKS

    return {
        PREFIX + "format": format_tag(fmt),
        PREFIX + "version": __version__,
        PREFIX + "config": json.dumps(model.config, sort_keys=True),
        PREFIX + "weights_sha256": weights_sha256(model),
        PREFIX + "tasks": json.dumps({t.name: [t.lo, t.hi] for t in TASKS.values()}),
        PREFIX + "tiles": json.dumps(getattr(model, "default_tiles", {}), sort_keys=True),
        PREFIX + "export": json.dumps(settings, sort_keys=True),
        PREFIX + "libraries": json.dumps(library_versions(fmt)),
    }


def library_versions(fmt: str) -> dict[str, str]:
    """The versions an engine of `fmt` depends on (also part of the engine cache's key)."""
    versions = {"torch": torch.__version__}
    for name in {"onnx": ("onnx", "onnxscript"), "tensorrt": ("onnx", "onnxscript", "tensorrt")}.get(fmt, ()):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an engine file, by its suffix (.onnx, .pt2, .engine); EngineError when
    the file is missing, damaged or not written by medir-fast."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"engine file not found: {path}")
    readers = {".onnx": _onnx_metadata, ".pt2": _package_metadata, ".engine": _container_metadata}
    if path.suffix not in readers:
        raise EngineError(f"{path.name}: an engine file ends in {', '.join(readers)}")
    try:
        meta = readers[path.suffix](path)
    except (ImportError, EngineError):
        raise
    except Exception as exc:  # each format's reader raises its own types for a damaged file
        raise EngineError(f"{path} is damaged or not a {path.suffix} engine ({type(exc).__name__})") from exc
    if not str(meta.get(PREFIX + "format", "")).startswith("medir-fast ") or PREFIX + "export" not in meta:
        raise EngineError(f"{path} is not an engine written by medir-fast export (no medir-fast metadata)")
    try:
        recorded = settings(meta)
        assert isinstance(recorded, dict) and isinstance(recorded["profile"], dict) and "precision" in recorded
    except (ValueError, KeyError, TypeError, AssertionError):
        raise EngineError(f"{path} has damaged medir-fast metadata, or an older medir-fast's; export it again") from None
    return meta


def settings(meta: dict[str, str]) -> dict:
    """The export settings recorded in an engine's metadata."""
    return json.loads(meta[PREFIX + "export"])


def fits(meta: dict[str, str], model: torch.nn.Module, fmt: str, precision: str | None = None) -> str | None:
    """Why the engine described by `meta` cannot run `model` (None: it can)."""
    tag = meta.get(PREFIX + "format", "")
    if tag != format_tag(fmt):
        if tag.rsplit(" ", 1)[0] == format_tag(fmt).rsplit(" ", 1)[0]:
            return f"written by another medir-fast version ({tag}); export it again"
        return f"a {tag or 'foreign'} file, not a medir-fast {fmt} engine"
    if json.loads(meta.get(PREFIX + "config", "null")) != json.loads(json.dumps(model.config)):
        return "built for another AMIR config"
    if meta.get(PREFIX + "weights_sha256") != weights_sha256(model):
        return "built from other weights"
    built = settings(meta).get("precision")
    if precision is not None and built != precision:
        return f"built for {built}, not {precision}"
    return None


def device_reason(meta: dict[str, str], device: torch.device) -> str | None:
    """Why compiled code recorded in `meta` cannot run on `device` (None: it can, or the engine
    is not compiled code, like an ONNX file)."""
    built = settings(meta).get("device")
    if built is None:
        return None
    here = compiled_for(device)
    return None if built == here else f"compiled for {describe_device(built)}, not {describe_device(here)}"


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _package_metadata(path: Path) -> dict[str, str]:
    """An AOTInductor package is a zip archive; the metadata given at compile time is kept, with
    AOTInductor's own keys, in a JSON file beside the compiled model. Read, never unpickled."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/data/aotinductor/" in name and name.endswith("metadata.json"):
                meta = json.loads(archive.read(name))
                if PREFIX + "format" in meta:
                    return meta
    return {}


def _container_metadata(path: Path) -> dict[str, str]:
    from .tensorrt import read_container

    return read_container(path, plan=False)[0]
