"""The PyTorch reference path: the AMIR module as it is, under autocast for fp16/bf16."""

from __future__ import annotations

import contextlib

import torch


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None  # runs wherever PyTorch runs


class EagerBackend:
    name = "eager"

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model.eval().to(device)
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, torch.float32)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                    if self.dtype != torch.float32 else contextlib.nullcontext())
        with autocast:
            out = self.model(batch)
        return out.float()


def make(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> EagerBackend:
    return EagerBackend(model, device, dtype)
