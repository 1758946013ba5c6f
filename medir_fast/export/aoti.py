"""AOTInductor packages (`.pt2`) of the eval AMIR, for C++ hosts (csrc/ AOTI backend).

The package takes one input, `[B, 1, H, W]` float32 in [0, 1], with B, H and W dynamic and
H, W multiples of 8 (the network's three 2x down-samplings); it returns `[B, 1, H, W]`.
Clip-and-scale and its inverse stay outside the package, in the runtime, so one package
serves every task preset.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Height and width are 8 * k: the AMIR needs multiples of 8 and at least 9 pixels (prompt network).
MIN_SIDE_UNITS = 2


def export_aoti(model: torch.nn.Module, path: str | Path, *, device: str | torch.device = "cpu",
                max_batch: int = 64, max_side: int = 4096, example_size: tuple[int, int] = (64, 64)) -> Path:
    """torch.export the eval `model` (moved to `device`) with dynamic batch/height/width, then
    AOTInductor-package it at `path`. Compiling takes minutes on a CPU (two for the tiny test model)."""
    device = torch.device(device)
    if max_batch < 1:
        raise ValueError(f"max batch must be >= 1, got {max_batch}")
    if max_side % 8 or max_side < 8 * MIN_SIDE_UNITS:
        raise ValueError(f"max side must be a multiple of 8 and at least {8 * MIN_SIDE_UNITS}, got {max_side}")
    h, w = example_size
    if h % 8 or w % 8 or min(h, w) < 8 * MIN_SIDE_UNITS or max(h, w) > max_side:
        raise ValueError(f"example size must be multiples of 8 in [{8 * MIN_SIDE_UNITS}, {max_side}], got {h}x{w}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must end in .pt2, got {path.name}")
    model = model.eval().to(device)
    # A dimension of size 1 cannot be dynamic in torch.export: max_batch 1 exports a fixed batch.
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    h8 = torch.export.Dim("h8", min=MIN_SIDE_UNITS, max=max_side // 8)
    w8 = torch.export.Dim("w8", min=MIN_SIDE_UNITS, max=max_side // 8)
    example = torch.rand(min(2, max_batch), 1, h, w, device=device)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 2: 8 * h8, 3: 8 * w8},))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path
