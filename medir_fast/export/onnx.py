"""ONNX files of the eval AMIR, self-describing, for ONNX Runtime and TensorRT's ONNX parser.

One input `image` `[B, 1, H, W]` float32 in [0, 1] with B, H and W dynamic within the shape
profile (H, W multiples of 8), one output `restored` of the same shape, float32 at every
precision; clip-and-scale stays outside, so one file serves every task. Exported with
PyTorch's supported (dynamo) exporter at opset 18, then checked: only ops (and attributes)
that TensorRT's ONNX parser takes (`unsupported_ops`). An fp16 file computes the backbone in
fp16 and keeps the float32 islands (`cast_backbone`); bf16 cannot be written, ONNX's Conv has no
bfloat16 type. The file's metadata records what it was built from (`metadata.describe`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path

import torch

from .metadata import describe
from .profile import ShapeProfile

OPSET = 18
# Ops of the exported AMIR that TensorRT's ONNX parser (10.x) supports; anything else fails the check.
TENSORRT_OPS = frozenset({
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "DepthToSpace", "Div", "Equal",
    "Erf", "Exp", "Expand", "Gather", "GatherElements", "Gelu", "Gemm", "Identity", "LayerNormalization",
    "LeakyRelu", "Log", "MatMul", "Max", "Min", "Mul", "Pow", "ReduceL2", "ReduceLogSumExp", "ReduceMax",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where",
})


def export_onnx(model: torch.nn.Module, path: str | Path, *, precision: str = "fp32",
                profile: ShapeProfile) -> Path:
    """Export the eval `model` (on the CPU; the caller's model is left as it is) to `path` at
    `precision` (fp32 or fp16) and check it (`unsupported_ops`)."""
    import onnx

    from ..model.amir import cast_backbone
    from ..restorer import PRECISIONS

    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"an ONNX file must end in .onnx, got {path.name}")
    model = copy.deepcopy(model).eval().float().cpu()
    traced = model if precision == "fp32" else cast_backbone(model, PRECISIONS[precision])
    with torch.no_grad(), _exporter_quiet():
        program = torch.onnx.export(traced, (profile.example_input(),), dynamo=True, opset_version=OPSET,
                                    verbose=False, input_names=["image"], output_names=["restored"],
                                    dynamic_shapes={"inp_img": profile.dynamic_dims()})
    proto = program.model_proto
    settings = dict(format="onnx", opset=OPSET, precision=precision, profile=profile.as_dict())
    onnx.helper.set_model_props(proto, describe(model, "onnx", settings))
    onnx.checker.check_model(proto)
    problems = unsupported_ops(proto)
    if problems:
        raise RuntimeError(f"the exported graph has what TensorRT's ONNX parser does not take: {'; '.join(problems)}")
    onnx.save(proto, str(path))
    return path


@contextlib.contextmanager
def _exporter_quiet():
    """PyTorch's exporter prints its progress and logs warnings about optional packages; a run
    of `medir-fast` keeps stdout and stderr for its own lines (both show with --debug)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    quiet = not logging.getLogger("medir_fast").isEnabledFor(logging.DEBUG)
    try:
        if quiet:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def unsupported_ops(proto) -> list[str]:
    """Ops outside TENSORRT_OPS, TopK that is not sorted, LayerNormalization whose mean or
    inverse-std output is used: one line each (empty: the graph is fine)."""
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    problems = []
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type not in TENSORRT_OPS:
            problems.append(f"op {node.op_type} ({node.name})")
        elif node.op_type == "TopK" and "sorted" in attrs and attrs["sorted"].i != 1:
            problems.append(f"TopK with sorted=0 ({node.name})")
        elif node.op_type == "LayerNormalization" and any(o and o in used for o in node.output[1:]):
            problems.append(f"LayerNormalization with its mean or inverse std used ({node.name})")
    return problems
