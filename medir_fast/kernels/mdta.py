"""Multi-DConv head transposed attention (MDTA) after the depth-wise qkv convolution:
L2 normalisation of q and k, softmax(q k^T * temperature) per head, attention times v.

The attention is across channels, so a head's score matrix is only [c, c] (c = C / heads)
while each of its entries sums over all H*W pixels. Three launches:
1. `_gram_kernel`: pixel chunks in parallel, each accumulating q k^T and the squared norms
   of q and k rows (normalising afterwards is the same as normalising first:
   <q/|q|, k/|k|> = <q, k> / (|q| |k|));
2. `_softmax_kernel`: sums the chunks, divides by the norms (F.normalize's eps = 1e-12),
   scales by the temperature, softmax over keys;
3. `_attn_v_kernel`: out = attn @ v over pixel tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_activation, mma, mma_flags, scaled


@triton.jit
def _gram_kernel(qkv_ptr, gram_ptr, norm_ptr, C, HW, CH, HEADS, CHUNK,
                 BLOCK_CH: tl.constexpr, BLOCK_N: tl.constexpr,
                 FP32_INPUTS: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    rows = tl.arange(0, BLOCK_CH)
    base = qkv_ptr + b.to(tl.int64) * 3 * C * HW + (h * CH + rows[:, None]) * HW
    gram = tl.zeros([BLOCK_CH, BLOCK_CH], tl.float32)
    nq = tl.zeros([BLOCK_CH], tl.float32)
    nk = tl.zeros([BLOCK_CH], tl.float32)
    for start in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, HW), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < CH) & (cols[None, :] < HW)
        q = tl.load(base + cols[None, :], mask=mask, other=0.0)
        k = tl.load(base + C * HW + cols[None, :], mask=mask, other=0.0)
        gram = mma(q, tl.trans(k), gram, FP32_INPUTS, UPCAST)
        qf = q.to(tl.float32)
        kf = k.to(tl.float32)
        nq += tl.sum(qf * qf, 1)
        nk += tl.sum(kf * kf, 1)
    out = bh * tl.num_programs(1) + split
    square = rows[:, None] * BLOCK_CH + rows[None, :]
    tl.store(gram_ptr + out * BLOCK_CH * BLOCK_CH + square, gram)
    tl.store(norm_ptr + (out * 2) * BLOCK_CH + rows, nq)
    tl.store(norm_ptr + (out * 2 + 1) * BLOCK_CH + rows, nk)


@triton.jit
def _softmax_kernel(gram_ptr, norm_ptr, temp_ptr, attn_ptr, CH, HEADS, SPLITS, BLOCK_CH: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.arange(0, BLOCK_CH)
    square = rows[:, None] * BLOCK_CH + rows[None, :]
    gram = tl.zeros([BLOCK_CH, BLOCK_CH], tl.float32)
    nq = tl.zeros([BLOCK_CH], tl.float32)
    nk = tl.zeros([BLOCK_CH], tl.float32)
    for s in range(SPLITS):
        part = bh * SPLITS + s
        gram += tl.load(gram_ptr + part * BLOCK_CH * BLOCK_CH + square)
        nq += tl.load(norm_ptr + (part * 2) * BLOCK_CH + rows)
        nk += tl.load(norm_ptr + (part * 2 + 1) * BLOCK_CH + rows)
    nq = tl.maximum(tl.sqrt(nq), 1e-12)
    nk = tl.maximum(tl.sqrt(nk), 1e-12)
    scores = gram / (nq[:, None] * nk[None, :]) * tl.load(temp_ptr + bh % HEADS).to(tl.float32)
    scores = tl.where(rows[None, :] < CH, scores, float("-inf"))
    scores = scores - tl.max(scores, 1)[:, None]
    e = tl.exp(scores)
    attn = e / tl.sum(e, 1)[:, None]
    tl.store(attn_ptr + bh * BLOCK_CH * BLOCK_CH + square, tl.where(rows[:, None] < CH, attn, 0.0))


@triton.jit
def _attn_v_kernel(qkv_ptr, attn_ptr, out_ptr, C, HW, CH, HEADS,
                   BLOCK_CH: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP32_INPUTS: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HEADS
    h = bh % HEADS
    rows = tl.arange(0, BLOCK_CH)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < CH) & (cols[None, :] < HW)
    channel = (h * CH + rows[:, None]) * HW + cols[None, :]
    v = tl.load(qkv_ptr + b.to(tl.int64) * 3 * C * HW + 2 * C * HW + channel, mask=mask, other=0.0)
    attn = tl.load(attn_ptr + bh * BLOCK_CH * BLOCK_CH + rows[:, None] * BLOCK_CH + rows[None, :])
    out = mma(attn.to(v.dtype), v, tl.zeros([BLOCK_CH, BLOCK_N], tl.float32), FP32_INPUTS, UPCAST)
    tl.store(out_ptr + b.to(tl.int64) * C * HW + channel, out.to(out_ptr.dtype.element_ty), mask=mask)


def mdta_attention(qkv: torch.Tensor, temperature: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [B, 3C, H, W] (after the depth-wise conv) -> attention output [B, C, H, W]
    (before project_out), in qkv's dtype; temperature [heads] (or [heads, 1, 1])."""
    check_activation(qkv, "qkv")
    B, C3, H, W = qkv.shape
    C, HW = C3 // 3, H * W
    if C3 % 3 or C % heads or temperature.numel() != heads:
        raise ValueError(f"MDTA: {C3} qkv channels and {heads} heads do not fit "
                         f"(temperature has {temperature.numel()})")
    ch = C // heads
    block_ch = max(16, triton.next_power_of_2(ch))
    block_n = max(16, min(triton.next_power_of_2(HW), scaled(4096) // block_ch))
    # Enough pixel chunks to fill the GPU (a few hundred programs); few in the interpreter.
    target = 8 if INTERPRET else 512
    splits = max(1, min(triton.cdiv(HW, block_n), target // (B * heads)))
    chunk = triton.cdiv(triton.cdiv(HW, splits), block_n) * block_n
    splits = triton.cdiv(HW, chunk)
    flags = mma_flags(qkv.dtype)
    dev = qkv.device
    gram = torch.empty((B * heads, splits, block_ch, block_ch), device=dev, dtype=torch.float32)
    norms = torch.empty((B * heads, splits, 2, block_ch), device=dev, dtype=torch.float32)
    _gram_kernel[(B * heads, splits)](qkv, gram, norms, C, HW, ch, heads, chunk,
                                      BLOCK_CH=block_ch, BLOCK_N=block_n, **flags)
    attn = torch.empty((B * heads, block_ch, block_ch), device=dev, dtype=torch.float32)
    _softmax_kernel[(B * heads,)](gram, norms, temperature.reshape(heads), attn, ch, heads, splits, BLOCK_CH=block_ch)
    out = torch.empty((B, C, H, W), device=dev, dtype=qkv.dtype)
    _attn_v_kernel[(B * heads, triton.cdiv(HW, block_n))](qkv, attn, out, C, HW, ch, heads,
                                                          BLOCK_CH=block_ch, BLOCK_N=block_n, **flags)
    return out
