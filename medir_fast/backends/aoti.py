"""The `aoti` backend: the model's AOTInductor package (`medir_fast.export.aoti`), loaded through
`torch._inductor.aoti_load_package`: the compiled code the C++ runtime runs, from Python.

The package is the file given (`--engine`), or the model's own, compiled for the device on first
use (minutes on a CPU) and cached (`medir_fast.export.cache`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import EngineBackend, amir_only

model_reason = amir_only


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"AOTInductor packages run on the CPU or CUDA devices, not {device.type}"
    return None


class AotiBackend(EngineBackend):
    name = "aoti"
    format = "aoti"

    def build_reason(self) -> str | None:
        if self.device.type == "cpu" and shutil.which(os.environ.get("CXX", "c++")) is None:
            return "AOTInductor compiles C++ for the CPU and no C++ compiler (c++ or $CXX) is installed"
        return None

    def load(self, path: Path) -> None:
        self.package = torch._inductor.aoti_load_package(
            str(path), device_index=-1 if self.device.index is None else self.device.index)

    def run_chunk(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.package(batch.to(self.device))


def make(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, engine=None) -> AotiBackend:
    return AotiBackend(model, device, dtype, engine)
