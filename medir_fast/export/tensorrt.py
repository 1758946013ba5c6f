"""TensorRT engines of the eval AMIR, built from its ONNX export with TensorRT's Python API (10.x).

The network is parsed strongly typed: each layer runs in the type the ONNX graph gives it, so an
fp16 engine keeps the float32 islands `cast_backbone` leaves (bf16 cannot be expressed: ONNX's
Conv has no bfloat16 type). One optimisation profile spans the engine's shape profile.

A TensorRT plan holds no metadata of its own, so a `.engine` file is a container: a magic line,
the length of a JSON header, the header (the metadata of `medir_fast.export.metadata` and the
plan's sha256), then the plan. Plans only run on the GPU model and TensorRT version that built
them; the header records both, and the backend refuses a plan from another.

This path has not yet been run: no machine of the project has had TensorRT. Everything that
does not need it (the container, the profile's shapes, the reasons it cannot run) is plain
Python tested on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path

import torch

from .metadata import PREFIX, EngineError, compiled_for, describe
from .profile import ShapeProfile

MAGIC = b"medir-fast tensorrt engine\n"
_LENGTH = struct.Struct("<Q")


def unavailable_reason(device: torch.device) -> str | None:
    """Why TensorRT cannot build or run engines here (None: it can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'medir-fast[tensorrt]' on a machine with an NVIDIA GPU)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "TensorRT runs on NVIDIA GPUs only and no CUDA device is in use here (--device cuda)"
    return None


def profile_shapes(profile: ShapeProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The optimisation profile in TensorRT's terms: input name -> (min, opt, max) NCHW shapes."""
    return {"image": tuple((b, 1, h, w) for b, h, w in (profile.min, profile.opt, profile.max))}


def write_container(path: Path, meta: dict[str, str], plan: bytes) -> None:
    header = json.dumps({**meta, PREFIX + "plan_sha256": hashlib.sha256(plan).hexdigest()}).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + _LENGTH.pack(len(header)) + header)
        f.write(plan)


def read_container(path: Path, plan: bool = True) -> tuple[dict[str, str], bytes | None]:
    """(metadata, plan) of a `.engine` file; the plan checked against its sha256 (plan=False:
    the header only). EngineError for anything that is not a whole container."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise EngineError(f"{path} is not a medir-fast TensorRT engine (no medir-fast header)")
        raw = f.read(_LENGTH.size)
        size = path.stat().st_size
        if len(raw) < _LENGTH.size or _LENGTH.unpack(raw)[0] > size:
            raise EngineError(f"{path} is truncated (its header is cut)")
        header = f.read(_LENGTH.unpack(raw)[0])
        try:
            meta = json.loads(header)
        except ValueError:
            raise EngineError(f"{path} has a damaged header") from None
        if not plan:
            return meta, None
        body = f.read()
    if hashlib.sha256(body).hexdigest() != meta.get(PREFIX + "plan_sha256"):
        raise EngineError(f"{path} is truncated or damaged (its plan does not match the header's sha256)")
    return meta, body


def build_plan(onnx_path: Path, precision: str, profile: ShapeProfile, device: torch.device) -> bytes:
    """A serialised TensorRT plan of the ONNX file, strongly typed, one optimisation profile;
    fp32 without TF32 (TensorRT allows it by default), so fp32 means float32 arithmetic."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes(profile).items():
        shapes.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(shapes)
    with torch.cuda.device(device):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build the engine (its log above says why)")
    return bytes(plan)


def export_tensorrt(model: torch.nn.Module, path: str | Path, *, precision: str = "fp32",
                    profile: ShapeProfile, device: torch.device) -> Path:
    """Export `model` to ONNX at `precision`, build a plan for `device` and write the container."""
    from ..backends import BackendUnavailable
    from .onnx import OPSET, export_onnx

    path = Path(path)
    if path.suffix != ".engine":
        raise ValueError(f"a TensorRT engine must end in .engine, got {path.name}")
    reason = unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"cannot build a TensorRT engine here: {reason}")
    import tensorrt as trt

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_onnx(model, Path(folder) / "amir.onnx", precision=precision, profile=profile)
        plan = build_plan(onnx_path, precision, profile, device)
    settings = dict(format="tensorrt", precision=precision, profile=profile.as_dict(), opset=OPSET,
                    device=compiled_for(device), tensorrt=trt.__version__)
    write_container(path, describe(model, "tensorrt", settings), plan)
    return path
