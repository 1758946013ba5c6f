"""Engine builders: an AMIR model into ahead-of-time engine files, and `medir-fast export`.

`aoti`: AOTInductor `.pt2` packages for the C++ runtime. `onnx`: `.onnx` files for ONNX Runtime
(and TensorRT's ONNX parser), with metadata saying what they were built from.
"""

from __future__ import annotations

import argparse

# format -> (file suffix, what it is for)
FORMATS = {"aoti": (".pt2", "AOTInductor package for the C++ runtime"),
           "onnx": (".onnx", "ONNX file for ONNX Runtime, opset 18, float32")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=list(FORMATS), default="aoti",
                        help="; ".join(f"{name}: {what} ({suffix})" for name, (suffix, what) in FORMATS.items()))
    parser.add_argument("--weights", help="a shipped model name (default, slim) or a checkpoint file (default: the shipped default)")
    parser.add_argument("-o", "--output", required=True, help="engine file to write (.pt2 or .onnx, as --format)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--device", default="cpu", help="aoti: device the package runs on: cpu, cuda or cuda:N")
    parser.add_argument("--max-batch", type=int, default=64, help="upper bound on the batch the engine takes")
    parser.add_argument("--max-side", type=int, default=4096,
                        help="upper bound on height and width the engine takes (multiple of 8)")


def run(args: argparse.Namespace) -> int:
    """The output path is checked before the (minutes-long) build; the file is written whole or
    not at all. Errors reach the command line's one-line handler."""
    from ..api import load_model
    from ..outputs import Outputs
    from ..restorer import resolve_device

    device = resolve_device(args.device)
    with Outputs(overwrite=args.overwrite) as outputs:
        target = outputs.add(args.output, "package", (FORMATS[args.format][0],))
        model = load_model(args.weights)
        if args.format == "onnx":
            from .onnx import export_onnx

            if device.type != "cpu":
                raise ValueError("--device applies to --format aoti; an ONNX file is exported on the CPU")
            export_onnx(model, outputs.temporary(target), max_batch=args.max_batch, max_side=args.max_side)
        else:
            from .aoti import export_aoti

            export_aoti(model, outputs.temporary(target), device=device, max_batch=args.max_batch,
                        max_side=args.max_side)
        outputs.commit()
    print(f"wrote {target}")
    return 0
