"""Engine builders: an AMIR model into ahead-of-time engine files, and `medir-fast export`.

`onnx`: `.onnx` files for ONNX Runtime (and TensorRT's ONNX parser). `aoti`: AOTInductor
`.pt2` packages for the `aoti` backend and the C++ runtime. `tensorrt`: `.engine` files for the
`tensorrt` backend. Each records what it was built from (`metadata`); `medir-fast info FILE`
prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import torch

from .profile import DEFAULT_PROFILE, TENSORRT_PROFILE, ShapeProfile, parse_shape, show


@dataclasses.dataclass(frozen=True)
class Format:
    suffix: str
    what: str
    precisions: tuple[str, ...]
    profile: ShapeProfile  # the default
    device: str  # the default device it is compiled for
    builder: str  # module:function, imported when used
    backend: str  # the backend that runs it


FORMATS = {
    "onnx": Format(".onnx", "ONNX file for ONNX Runtime and TensorRT's parser, opset 18", ("fp32", "fp16"),
                   DEFAULT_PROFILE, "cpu", "medir_fast.export.onnx:export_onnx", "onnxruntime"),
    "aoti": Format(".pt2", "AOTInductor package for the aoti backend and the C++ runtime", ("fp32", "fp16", "bf16"),
                   DEFAULT_PROFILE, "cpu", "medir_fast.export.aoti:export_aoti", "aoti"),
    "tensorrt": Format(".engine", "TensorRT engine for the tensorrt backend (NVIDIA GPUs)", ("fp32", "fp16"),
                       TENSORRT_PROFILE, "cuda", "medir_fast.export.tensorrt:export_tensorrt", "tensorrt"),
}
SUFFIXES = {f.suffix: name for name, f in FORMATS.items()}


def precision_reason(format: str, precision: str) -> str | None:
    """Why `format` engines cannot be built in `precision` (None: they can)."""
    if precision in FORMATS[format].precisions:
        return None
    return (f"{format} engines are built in {', '.join(FORMATS[format].precisions)}, not {precision}"
            + (" (ONNX's Conv has no bfloat16 type; bf16 engines: --format aoti)" if precision == "bf16" else ""))


def export(model: torch.nn.Module, path: str | Path, format: str, *, precision: str = "fp32",
           profile: ShapeProfile | None = None, device: str | torch.device = "cpu") -> Path:
    """Write an engine of the eval AMIR `model` at `path` (suffix as the format). ONNX files are
    exported on the CPU and run anywhere; AOTInductor packages and TensorRT engines are compiled
    for `device`. The caller's model is left as it is."""
    check_settings(format, precision)
    spec = FORMATS[format]
    device = torch.device(device)
    if format == "onnx" and device.type != "cpu":
        raise ValueError("an ONNX file is exported on the CPU and runs on any device; --device applies to aoti and tensorrt")
    module, function = spec.builder.split(":")
    build = getattr(importlib.import_module(module), function)
    options = dict(precision=precision, profile=profile or spec.profile)
    return build(model, path, **options) if format == "onnx" else build(model, path, **options, device=device)


def check_settings(format: str, precision: str) -> None:
    """A format and precision that can be built together (ValueError otherwise)."""
    if format not in FORMATS:
        raise ValueError(f"unknown engine format {format!r}; use {', '.join(FORMATS)}")
    reason = precision_reason(format, precision)
    if reason is not None:
        raise ValueError(reason)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=list(FORMATS), default=None,
                        help="default: by the output's suffix; " + "; ".join(
                            f"{name}: {f.what} ({f.suffix}; {', '.join(f.precisions)})" for name, f in FORMATS.items()))
    parser.add_argument("--weights", help="a shipped model name (default, slim) or a checkpoint file (default: the shipped default)")
    parser.add_argument("-o", "--output", required=True, help="engine file to write (its suffix as --format)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="what the backbone computes in (input, output and the float32 islands stay float32)")
    for name in ("min", "opt", "max"):
        defaults = ", ".join(f"{show(getattr(f.profile, name))} for {fmt}" for fmt, f in FORMATS.items())
        parser.add_argument(f"--{name}-shape", metavar="BxHxW", type=_shape, default=None,
                            help=f"the {name} batch x height x width the engine takes (default: {defaults}"
                                 + ("; kept between the min and max given)" if name == "opt" else ")"))
    parser.add_argument("--device", default=None, help="aoti, tensorrt: the device it is compiled for: cpu, cuda or cuda:N "
                                                       "(default: cpu for aoti, cuda for tensorrt)")


def _shape(text: str):
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """The output path and the settings are checked before the (minutes-long) build; the file is
    written whole or not at all. Errors reach the command line's one-line handler."""
    from ..api import load_model
    from ..outputs import Outputs
    from ..restorer import resolve_device

    fmt = args.format or SUFFIXES.get(Path(args.output).suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the engine format from {args.output!r}: give --format, or an output ending in "
                         f"{', '.join(SUFFIXES)}")
    check_settings(fmt, args.precision)
    spec = FORMATS[fmt]
    lo, hi = args.min_shape or spec.profile.min, args.max_shape or spec.profile.max
    opt = args.opt_shape or tuple(min(max(v, a), b) for v, a, b in zip(spec.profile.opt, lo, hi))
    profile = ShapeProfile(lo, opt, hi)
    if fmt == "tensorrt":  # before the device: that TensorRT is missing is the first thing to fix
        from ..backends import BackendUnavailable
        from .tensorrt import unavailable_reason

        reason = unavailable_reason(torch.device("cuda"))
        if reason is not None and "not installed" in reason:
            raise BackendUnavailable(f"cannot build a TensorRT engine here: {reason}")
    device = resolve_device(args.device or spec.device)
    with Outputs(overwrite=args.overwrite) as outputs:
        target = outputs.add(args.output, "engine", (spec.suffix,))
        model = load_model(args.weights)
        export(model, outputs.temporary(target), fmt, precision=args.precision, profile=profile, device=device)
        outputs.commit()
    print(f"wrote {target}")
    return 0
