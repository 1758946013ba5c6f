"""The `onnxruntime` backend: the model's ONNX engine (`medir_fast.export.onnx`) run by ONNX
Runtime: its CPU provider, or the CUDA provider where onnxruntime-gpu is installed.

The engine is the file given (`--engine`), or the model's own, exported on first use (about half
a minute on a CPU) and cached (`medir_fast.export.cache`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import BackendUnavailable, EngineBackend, amir_only


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (what PyTorch's exporter translates with)
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install onnx onnxscript onnxruntime)"
    from ..export import precision_reason
    from ..restorer import precision_name

    reason = precision_reason("onnx", precision_name(dtype))
    if reason is not None:
        return reason
    if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime has no CUDA provider (pip install 'medir-fast[gpu]')"
    if device.type not in ("cpu", "cuda"):
        return f"no ONNX Runtime provider for {device.type}"
    return None


model_reason = amir_only


class OnnxRuntimeBackend(EngineBackend):
    name = "onnxruntime"
    format = "onnx"

    def load(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # TF32 off: an fp32 engine computes in fp32, as the eager fp32 reference does
        cuda = ([("CUDAExecutionProvider", {"device_id": self.device.index or 0, "use_tf32": 0})]
                if self.device.type == "cuda" else [])
        self.session = onnxruntime.InferenceSession(str(path), options, providers=[*cuda, "CPUExecutionProvider"])
        if cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailable("onnxruntime could not load its CUDA provider here (see its log); "
                                     "use --device cpu or another backend")

    def run_chunk(self, batch: torch.Tensor) -> torch.Tensor:
        image = batch.cpu().numpy()
        return torch.from_numpy(np.asarray(self.session.run(["restored"], {"image": image})[0]))


def make(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(model, device, dtype, engine)
