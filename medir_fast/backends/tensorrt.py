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
    from ..export import precision_reason
    from ..export.tensorrt import unavailable_reason as reason
    from ..restorer import precision_name

    return precision_reason("tensorrt", precision_name(dtype)) or reason(device)


class TensorRTBackend(EngineBackend):
    name = "tensorrt"
    format = "tensorrt"

    def runtime_reason(self, meta: dict[str, str]) -> str | None:
        """A plan runs only with the TensorRT version that built it."""
        import tensorrt

        from ..export.metadata import settings

        built = settings(meta).get("tensorrt")
        return None if built == tensorrt.__version__ else f"built with TensorRT {built}, this is {tensorrt.__version__}"

    def load(self, path: Path) -> None:
        import tensorrt as trt

        from ..export.metadata import EngineError
        from ..export.tensorrt import read_container

        _, plan = read_container(path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.cuda_engine = self.runtime.deserialize_cuda_engine(plan)
            if self.cuda_engine is None:
                raise EngineError(f"TensorRT could not load {path} (its log above says why)")
            self.context = self.cuda_engine.create_execution_context()

    def run_chunk(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            image = batch.to(self.device).contiguous()
            if not self.context.set_input_shape("image", tuple(image.shape)):
                raise RuntimeError(f"TensorRT refused the input shape {tuple(image.shape)}")
            restored = torch.empty(tuple(self.context.get_tensor_shape("restored")), device=self.device)
            self.context.set_tensor_address("image", image.data_ptr())
            self.context.set_tensor_address("restored", restored.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the engine (its log above says why)")
        return restored


def make(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None) -> TensorRTBackend:
    return TensorRTBackend(model, device, dtype, engine)
