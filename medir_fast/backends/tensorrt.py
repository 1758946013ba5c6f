"""The `tensorrt` backend: the model's TensorRT engine (`medir_fast.export.tensorrt`) run on an
NVIDIA GPU through TensorRT's Python API (10.x), on PyTorch's current CUDA stream.

The engine is the file given (`--engine`), or the model's own, built on first use (minutes) and
cached (`medir_fast.export.cache`). This path has not yet been run: no machine of the project
has had TensorRT; here it says why it cannot run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import EngineBackend, amir_only

model_reason = amir_only


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    from ..export.tensorrt import unavailable_reason as reason

    if dtype == torch.bfloat16:
        return "TensorRT engines are fp32 or fp16 (ONNX's Conv has no bfloat16 type)"
    return reason(device)


class TensorRTBackend(EngineBackend):
    name = "tensorrt"
    format = "tensorrt"

    def device_reason(self, settings: dict) -> str | None:
        import tensorrt

        from ..export.tensorrt import gpu_of

        if settings.get("tensorrt") != tensorrt.__version__:
            return f"built with TensorRT {settings.get('tensorrt')}, this is {tensorrt.__version__}"
        built, here = settings.get("gpu", {}), gpu_of(self.device)
        if built.get("compute_capability") != here["compute_capability"]:
            return f"built for a {built.get('name')}, this is a {here['name']}"
        return None

    def load(self, path: Path) -> None:
        import tensorrt as trt

        from ..export.metadata import EngineError
        from ..export.tensorrt import read_container

        _, plan = read_container(path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.plan = self.runtime.deserialize_cuda_engine(plan)
        if self.plan is None:
            raise EngineError(f"TensorRT could not load {path} (its log above says why)")
        self.context = self.plan.create_execution_context()

    def run_chunk(self, batch: torch.Tensor) -> torch.Tensor:
        image = batch.to(self.device).contiguous()
        restored = torch.empty_like(image)
        self.context.set_input_shape("image", tuple(image.shape))
        self.context.set_tensor_address("image", image.data_ptr())
        self.context.set_tensor_address("restored", restored.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine (its log above says why)")
        return restored


def make(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None) -> TensorRTBackend:
    return TensorRTBackend(model, device, dtype, engine)
