"""Channel routing, x + (x * gamma + beta) * sigmoid(fc(prompt)), in one pass, optionally
fused with the LayerNorm of the Transformer block that follows it.

`fc(prompt)` is a [B, C] matrix-vector product done once per image by the caller; the kernel
applies the sigmoid gate per (image, channel) while the tile is in registers, writes the routed
tensor (the next block's residual) and, when asked, its LayerNorm (the next block's `norm1`)
from the same read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_activation, pixel_block, warps_for
from .layernorm import normalize_columns


@triton.jit
def _channel_routing_kernel(x_ptr, logit_ptr, gamma_ptr, beta_ptr, out_ptr, w_ptr, b_ptr, norm_ptr, C, HW,
                            NORM: tl.constexpr, WITH_BIAS: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mask = cmask[:, None] & (offs_p[None, :] < HW)
    offsets = b.to(tl.int64) * C * HW + offs_c[:, None] * HW + offs_p[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.sigmoid(tl.load(logit_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32))
    gamma = tl.load(gamma_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    routed = x + (x * gamma[:, None] + beta[:, None]) * gate[:, None]
    routed = tl.where(mask, routed.to(out_ptr.dtype.element_ty), 0.0)
    tl.store(out_ptr + offsets, routed, mask=mask)
    if NORM:
        # The norm sees the routed tensor as stored (rounded to the output dtype), as the
        # unfused pair of modules would.
        y = normalize_columns(routed.to(tl.float32), mask, w_ptr, b_ptr, offs_c, C, WITH_BIAS)
        tl.store(norm_ptr + offsets, y.to(norm_ptr.dtype.element_ty), mask=mask)


def channel_routing(x: torch.Tensor, gate_logits: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None, norm_dtype: torch.dtype | None = None):
    """x [B,C,H,W], gate_logits = fc(prompt) [B,C], gamma/beta [C] (or [1,C,1,1]).

    Returns the routed tensor; with `norm_weight` also LayerNorm(routed) (BiasFree when
    `norm_bias` is None), as a pair (routed, normed). Dtypes: `out_dtype` for the routed
    tensor, `norm_dtype` for the normed one (both default to x's).
    """
    check_activation(x)
    B, C, H, W = x.shape
    if gate_logits.shape != (B, C) or gamma.numel() != C or beta.numel() != C:
        raise ValueError(f"channel routing over {C} channels: gate logits [{B}, {C}], gamma/beta [{C}]")
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    normed = torch.empty_like(x, dtype=norm_dtype or x.dtype) if norm_weight is not None else out
    block_c = triton.next_power_of_2(C)
    block_p = pixel_block(block_c, H * W)
    grid = (B, triton.cdiv(H * W, block_p))
    w = norm_weight if norm_weight is not None else gamma
    _channel_routing_kernel[grid](x, gate_logits.contiguous(), gamma.reshape(C), beta.reshape(C), out,
                                  w, norm_bias if norm_bias is not None else w, normed, C, H * W,
                                  NORM=norm_weight is not None, WITH_BIAS=norm_bias is not None,
                                  BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps_for(block_c * block_p))
    return (out, normed) if norm_weight is not None else out
