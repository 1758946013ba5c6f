"""ONNX files of the eval AMIR, self-describing, for ONNX Runtime and TensorRT's ONNX parser.

One input `image` `[B, 1, H, W]` float32 in [0, 1] with B, H and W dynamic (H, W multiples of 8),
one output `restored` of the same shape; clip-and-scale stays outside, so one file serves every
task. Exported with PyTorch's supported (dynamo) exporter at opset 18, then checked: only ops
(and attributes) that TensorRT's ONNX parser takes (`unsupported_ops`). The file's metadata
records what it was built from (`metadata`), so that a backend can refuse a file that does not
fit the model it is asked to run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
from pathlib import Path

import torch

OPSET = 18
FORMAT = "medir-fast onnx 1"
MIN_SIDE_UNITS = 2  # height and width are 8 * k, k >= 2: the network needs multiples of 8, at least 9 pixels

# Ops of the exported AMIR that TensorRT's ONNX parser (10.x) supports; anything else fails the check.
TENSORRT_OPS = frozenset({
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "DepthToSpace", "Div", "Equal",
    "Erf", "Exp", "Expand", "Gather", "GatherElements", "Gelu", "Gemm", "Identity", "LayerNormalization",
    "LeakyRelu", "Log", "MatMul", "Max", "Min", "Mul", "Pow", "ReduceL2", "ReduceLogSumExp", "ReduceMax",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where",
})


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def metadata(model: torch.nn.Module, settings: dict) -> dict[str, str]:
    """What an engine file was built from: the format, the AMIR config, the weights' sha256, the
    task ranges and the weights' tiles, the medir-fast and library versions, the export settings."""
    import onnx

    from .. import __version__
    from ..tasks import TASKS

    return {
        "medir_fast.format": FORMAT,
        "medir_fast.version": __version__,
        "medir_fast.config": json.dumps(model.config, sort_keys=True),
        "medir_fast.weights_sha256": weights_sha256(model),
        "medir_fast.tasks": json.dumps({t.name: [t.lo, t.hi] for t in TASKS.values()}),
        "medir_fast.tiles": json.dumps(getattr(model, "default_tiles", {}), sort_keys=True),
        "medir_fast.export": json.dumps(settings, sort_keys=True),
        "medir_fast.libraries": json.dumps({"torch": torch.__version__, "onnx": onnx.__version__}),
    }


def export_onnx(model: torch.nn.Module, path: str | Path, *, max_batch: int = 64, max_side: int = 4096,
                example_size: tuple[int, int] = (64, 64)) -> Path:
    """Export the eval `model` (float32, on the CPU) to `path` and check it (`unsupported_ops`)."""
    import onnx

    if max_batch < 2:
        raise ValueError(f"max batch must be >= 2 (a dynamic batch), got {max_batch}")
    if max_side % 8 or max_side < 8 * MIN_SIDE_UNITS:
        raise ValueError(f"max side must be a multiple of 8 and at least {8 * MIN_SIDE_UNITS}, got {max_side}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"an ONNX file must end in .onnx, got {path.name}")
    model = copy.deepcopy(model).eval().float().cpu()  # the caller's model stays where it is
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    h8 = torch.export.Dim("h8", min=MIN_SIDE_UNITS, max=max_side // 8)
    w8 = torch.export.Dim("w8", min=MIN_SIDE_UNITS, max=max_side // 8)
    example = torch.rand(2, 1, *example_size)
    with torch.no_grad(), _exporter_quiet():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=["image"], output_names=["restored"],
                                    dynamic_shapes={"inp_img": {0: batch, 2: 8 * h8, 3: 8 * w8}})
    proto = program.model_proto
    settings = dict(opset=OPSET, precision="fp32", max_batch=max_batch, max_side=max_side)
    onnx.helper.set_model_props(proto, metadata(model, settings))
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


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an ONNX file written by `export_onnx` (the file is parsed whole)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
