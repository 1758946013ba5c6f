"""Depth-wise 3x3 convolution (padding 1) on NCHW, a block of channels by a run of
pixels per program.

PyTorch's generic depth-wise kernel is the largest single cost of the eager model; here each
program reads its tile and the 3x3 halo straight from the NCHW planes (neighbours hit cache).
`dw3x3_tile` is shared with the fused GDFN kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_activation, scaled


@triton.jit
def dw3x3_tile(planes, weights, cmask, offs_p, H, W, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """float32 [channels, pixels] tile of a 3x3 depth-wise convolution with zero padding.

    planes: [channels, 1] pointers to each channel's [H, W] plane; weights: [channels]
    pointers to its 9 taps; offs_p: flat pixel indices (row * W + col).
    """
    rows = offs_p // W
    cols = offs_p % W
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            r = rows + (dy - 1)
            c = cols + (dx - 1)
            inside = (r >= 0) & (r < H) & (c >= 0) & (c < W) & (offs_p < H * W)
            v = tl.load(planes + (r * W + c)[None, :], mask=cmask[:, None] & inside[None, :], other=0.0)
            tap = tl.load(weights + dy * 3 + dx, mask=cmask, other=0.0).to(tl.float32)
            acc += v.to(tl.float32) * tap[:, None]
    return acc


@triton.jit
def _dwconv3x3_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, c_blocks,
                      HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0) // c_blocks
    offs_c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs_c < C
    planes = x_ptr + (b.to(tl.int64) * C + offs_c[:, None]) * H * W
    acc = dw3x3_tile(planes, w_ptr + offs_c * 9, cmask, offs_p, H, W, BLOCK_C, BLOCK_P)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + (b.to(tl.int64) * C + offs_c[:, None]) * H * W + offs_p[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & (offs_p < H * W)[None, :])


def channel_pixel_tiles(C: int, HW: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for [channels, flat pixels] tiles of a per-channel operation."""
    block_p = min(triton.next_power_of_2(HW), scaled(256))
    block_c = min(triton.next_power_of_2(C), max(1, scaled(2048) // block_p))
    return block_c, block_p


def dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight [C,1,3,3], bias, padding=1, groups=C), output in x's dtype."""
    check_activation(x)
    B, C, H, W = x.shape
    if weight.shape != (C, 1, 3, 3):
        raise ValueError(f"depth-wise weight must be [{C}, 1, 3, 3], got {tuple(weight.shape)}")
    out = torch.empty_like(x)
    block_c, block_p = channel_pixel_tiles(C, H * W)
    c_blocks = triton.cdiv(C, block_c)
    grid = (B * c_blocks, triton.cdiv(H * W, block_p))
    _dwconv3x3_kernel[grid](x, weight.contiguous(), bias if bias is not None else weight, out, C, H, W, c_blocks,
                            HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_P=block_p)
    return out
