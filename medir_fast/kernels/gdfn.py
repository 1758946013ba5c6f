"""The middle of the gated depth-wise feed-forward network (GDFN), fused:
depth-wise 3x3 conv of both halves of project_in's output, then GELU(x1) * x2.

A program computes a [channels, pixels] output tile from the two input channels each output
needs, so the 2*hidden-channel conv result is never written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_activation, gelu
from .dwconv import channel_pixel_tiles, dw3x3_tile


@triton.jit
def _gdfn_gate_kernel(y_ptr, w_ptr, b_ptr, out_ptr, HIDDEN, H, W, c_blocks,
                      HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0) // c_blocks
    offs_c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs_c < HIDDEN
    hw = H * W
    first = y_ptr + (b.to(tl.int64) * 2 * HIDDEN + offs_c[:, None]) * hw
    x1 = dw3x3_tile(first, w_ptr + offs_c * 9, cmask, offs_p, H, W, BLOCK_C, BLOCK_P)
    x2 = dw3x3_tile(first + HIDDEN * hw, w_ptr + (offs_c + HIDDEN) * 9, cmask, offs_p, H, W, BLOCK_C, BLOCK_P)
    if HAS_BIAS:
        x1 += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        x2 += tl.load(b_ptr + offs_c + HIDDEN, mask=cmask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + (b.to(tl.int64) * HIDDEN + offs_c[:, None]) * hw + offs_p[None, :]
    tl.store(out, (gelu(x1) * x2).to(out_ptr.dtype.element_ty), mask=cmask[:, None] & (offs_p < hw)[None, :])


def gdfn_gate(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, 2h, H, W] (project_in output) -> GELU(x1) * x2 [B, h, H, W], where
    x1, x2 = dwconv(y).chunk(2, 1) with weight [2h, 1, 3, 3]."""
    check_activation(y, "y")
    B, C2, H, W = y.shape
    if C2 % 2 or weight.shape != (C2, 1, 3, 3):
        raise ValueError(f"GDFN: need an even channel count and weight [{C2}, 1, 3, 3], "
                         f"got {C2} and {tuple(weight.shape)}")
    hidden = C2 // 2
    out = torch.empty((B, hidden, H, W), device=y.device, dtype=y.dtype)
    block_c, block_p = channel_pixel_tiles(hidden, H * W)
    c_blocks = triton.cdiv(hidden, block_c)
    grid = (B * c_blocks, triton.cdiv(H * W, block_p))
    _gdfn_gate_kernel[grid](y, weight.contiguous(), bias if bias is not None else weight, out, hidden, H, W, c_blocks,
                            HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_P=block_p)
    return out
