"""AOTInductor packages (`.pt2`) of the eval AMIR, for the `aoti` backend and C++ hosts (csrc/).

The package takes one input, `[B, 1, H, W]` float32 in [0, 1], with B, H and W dynamic within
the shape profile (H, W multiples of 8); it returns `[B, 1, H, W]` float32. At fp16 or bf16 the
backbone computes in that type and the float32 islands stay (`cast_backbone`). Clip-and-scale
and its inverse stay outside, in the runtime, so one package serves every task preset. The
metadata (`metadata.describe`) is compiled in; C++ hosts read it with the package loader's
`get_metadata()`, Python without loading it (`metadata.read_metadata`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .metadata import compiled_for, describe
from .profile import ShapeProfile


def export_aoti(model: torch.nn.Module, path: str | Path, *, precision: str = "fp32", profile: ShapeProfile,
                device: torch.device) -> Path:
    """torch.export the eval `model` on `device` with the profile's dynamic dimensions, then
    AOTInductor-compile and package it at `path`. Minutes on a CPU (one or two for the tiny
    test model). The caller's model is left as it is."""
    from ..model.amir import cast_backbone
    from ..restorer import PRECISIONS

    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must end in .pt2, got {path.name}")
    model = copy.deepcopy(model).eval().float()
    traced = (model if precision == "fp32" else cast_backbone(model, PRECISIONS[precision])).to(device)
    settings = dict(format="aoti", precision=precision, profile=profile.as_dict(), device=compiled_for(device))
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(traced, (profile.example_input().to(device),),
                                      dynamic_shapes=(profile.dynamic_dims(),))
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs={"aot_inductor.metadata": describe(model, "aoti", settings)})
    return path
