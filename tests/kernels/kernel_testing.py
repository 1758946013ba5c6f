"""Shared helpers of the kernel tests: device, per-dtype tolerances, shapes, comparison."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Per output dtype: (atol, rtol) against the float32 reference computed from the same
# (rounded) inputs. bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), fp16 11 bits.
TOLERANCES = {
    torch.float32: (2e-4, 2e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
DTYPES = list(TOLERANCES)

# (batch, channels, height, width): odd sizes that no block size divides, C = 8, 12, 42, 13;
# the last is large enough to span several pixel and channel tiles at the GPU tile sizes.
SHAPES = [(1, 8, 7, 9), (2, 12, 5, 13), (1, 42, 11, 6), (1, 13, 9, 17), (1, 12, 23, 19)]


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Fresh random parameters: the default init leaves gates at zero, hiding bugs."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.to(DEVICE).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare in float32 with the dtype's tolerance; `scale` widens atol for larger values."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    assert not actual.isnan().any(), "unwritten (poisoned) or NaN elements in the output"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)
