"""LayerNorm over the channels of an NCHW tensor, without the two transposes of the reference.

A program owns a tile of pixels with all their channels ([C, pixels], pixels contiguous in
memory) and normalises each column. `WithBias` subtracts the mean and adds a bias; `BiasFree`
divides by the same standard deviation but keeps the mean (as Restormer does).
`add_layernorm` also adds a residual branch first and writes the sum (the Transformer block's
`x + attn(...)` followed by `norm2`). `normalize_columns` is shared with the channel-routing
kernel, which fuses the next norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_activation, pixel_block, warps_for

EPS = 1e-5


@triton.jit
def normalize_columns(x, channel_mask, w_ptr, b_ptr, offs_c, C, WITH_BIAS: tl.constexpr):
    """x float32 [BLOCK_C, P] with zeros outside `channel_mask` -> LayerNorm of each column."""
    mean = tl.sum(x, 0) / C
    centred = tl.where(channel_mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / C + 1e-5)
    w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    if WITH_BIAS:
        b = tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
        return centred * rstd[None, :] * w[:, None] + b[:, None]
    else:
        return x * rstd[None, :] * w[:, None]


@triton.jit
def _layernorm_kernel(x_ptr, branch_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, C, HW, ADD: tl.constexpr,
                      WITH_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_c[:, None] < C) & (offs_p[None, :] < HW)
    offsets = b.to(tl.int64) * C * HW + offs_c[:, None] * HW + offs_p[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        x += tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, x, mask=mask)
        x = x.to(tl.float32)  # normalise the sum as stored, as the unfused pair would
    y = normalize_columns(x, mask, w_ptr, b_ptr, offs_c, C, WITH_BIAS)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, branch, weight, bias, out_dtype):
    check_activation(x)
    B, C, H, W = x.shape
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"LayerNorm over {C} channels: weight/bias must be [{C}]")
    if branch is not None:
        check_activation(branch, "branch")
        if branch.shape != x.shape:
            raise ValueError(f"residual branch shape {tuple(branch.shape)} differs from x {tuple(x.shape)}")
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    total = torch.empty_like(x) if branch is not None else out
    block_c = triton.next_power_of_2(C)
    block_p = pixel_block(block_c, H * W)
    grid = (B, triton.cdiv(H * W, block_p))
    _layernorm_kernel[grid](x, branch if branch is not None else x, total, weight,
                            bias if bias is not None else weight, out, C, H * W, ADD=branch is not None,
                            WITH_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_P=block_p,
                            num_warps=warps_for(block_c * block_p))
    return total, out


def layernorm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Restormer's LayerNorm(x) for NCHW x; bias None means BiasFree. Output in `out_dtype`
    (default x's): a float32 residual stream can feed bf16/fp16 convolutions directly."""
    return _launch(x, None, weight, bias, out_dtype)[1]


def add_layernorm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next LayerNorm in one pass: (x + branch in x's dtype,
    LayerNorm(x + branch) in `out_dtype`). Saves re-reading the sum from memory."""
    return _launch(x, branch, weight, bias, out_dtype)
