"""Spatial routing (AMIR's per-pixel mixture of experts), fused, per-tile masked design.

For every pixel of the tile: 4 gating logits (pixel features @ w_gate[:C], plus the per-image
prompt term fc(prompt) @ w_gate[C:] that the caller computes once per image), top-2, softmax
over the two, the two chosen expert MLPs (Linear, exact GELU, Linear), the stable log-space
combination log(g1 exp(E1) + g2 exp(E2)) and the residual. An expert is evaluated for the
tile only when at least one of its pixels chose it, and each pixel keeps only its own two
results: no dense 4-expert tensor in memory, no sort, no host sync.

Gating is float32 from the stored activations (so the top-2 choice matches the float32
reference); the expert products run in the expert weights' dtype with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_activation, gelu, mma, mma_flags, scaled

NUM_EXPERTS = 4


@triton.jit
def top2_gates(xf, wg_ptr, gate_bias_ptr, b, offs_c, cmask, E: tl.constexpr, BLOCK_P: tl.constexpr):
    """Gating of a [P, C] float32 tile of image b: logits [P, E] = xf @ w_gate[:C] + the image's
    prompt term; top-2 (ties go to the lower index) and the log of the softmax over the two.
    Returns (best expert, second expert, log gate of best, log gate of second), each [P]."""
    experts = tl.arange(0, E)
    logits = tl.zeros([BLOCK_P, E], tl.float32)
    for e in tl.static_range(E):
        wg = tl.load(wg_ptr + offs_c * E + e, mask=cmask, other=0.0)
        logit = tl.sum(xf * wg[None, :], 1) + tl.load(gate_bias_ptr + b * E + e)
        logits = tl.where(experts[None, :] == e, logit[:, None], logits)
    best = tl.max(logits, 1)
    first = tl.argmax(logits, 1)
    rest = tl.where(experts[None, :] == first[:, None], float("-inf"), logits)
    runner_up = tl.max(rest, 1)
    second = tl.argmax(rest, 1)
    log_g1 = -tl.log(1.0 + tl.exp(runner_up - best))
    log_g2 = (runner_up - best) + log_g1
    return first, second, log_g1, log_g2


@triton.jit
def expert_mlp(x, e, w1_ptr, b1_ptr, w2_ptr, b2_ptr, offs_c, cmask, C, HIDDEN,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
               FP32_INPUTS: tl.constexpr, UPCAST: tl.constexpr):
    """Expert e (Linear, exact GELU, Linear) on a [P, C] tile: float32 [P, C], products in the
    weights' dtype with float32 accumulation, the hidden layer streamed in BLOCK_H slices."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < HIDDEN
        w1 = tl.load(w1_ptr + e * HIDDEN * C + offs_h[None, :] * C + offs_c[:, None],
                     mask=cmask[:, None] & hmask[None, :], other=0.0)  # [C, H] = fc1.weight^T
        b1 = tl.load(b1_ptr + e * HIDDEN + offs_h, mask=hmask, other=0.0).to(tl.float32)
        hidden = mma(x.to(w1.dtype), w1, tl.zeros([BLOCK_P, BLOCK_H], tl.float32), FP32_INPUTS, UPCAST)
        hidden = gelu(hidden + b1[None, :])
        w2 = tl.load(w2_ptr + e * C * HIDDEN + offs_c[None, :] * HIDDEN + offs_h[:, None],
                     mask=hmask[:, None] & cmask[None, :], other=0.0)  # [H, C] = fc2.weight^T
        acc = mma(hidden.to(w2.dtype), w2, acc, FP32_INPUTS, UPCAST)
    return acc + tl.load(b2_ptr + e * C + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _spatial_routing_kernel(x_ptr, gate_bias_ptr, wg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, topk_ptr,
                            C, HW, HIDDEN,
                            E: tl.constexpr, STORE_TOPK: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                            FP32_INPUTS: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mask = (offs_p[:, None] < HW) & cmask[None, :]
    offsets = b.to(tl.int64) * C * HW + offs_c[None, :] * HW + offs_p[:, None]  # [pixels, channels]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    xf = x.to(tl.float32)

    first, second, log_g1, log_g2 = top2_gates(xf, wg_ptr, gate_bias_ptr, b, offs_c, cmask, E, BLOCK_P)

    # The chosen experts' outputs (plus log gate), kept per rank: z1 for the best, z2 for the second.
    z1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    z2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for e in range(E):
        pick1 = first == e
        pick2 = second == e
        if tl.sum((pick1 | pick2).to(tl.int32)) > 0:
            out_e = expert_mlp(x, e, w1_ptr, b1_ptr, w2_ptr, b2_ptr, offs_c, cmask, C, HIDDEN,
                               BLOCK_P, BLOCK_C, BLOCK_H, FP32_INPUTS, UPCAST)
            z1 = tl.where(pick1[:, None], out_e + log_g1[:, None], z1)
            z2 = tl.where(pick2[:, None], out_e + log_g2[:, None], z2)

    top = tl.maximum(z1, z2)
    y = top + tl.log(tl.exp(z1 - top) + tl.exp(z2 - top)) + xf
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_TOPK:
        pmask = offs_p < HW
        index = topk_ptr + b.to(tl.int64) * 2 * HW + offs_p
        tl.store(index, first.to(tl.int32), mask=pmask)
        tl.store(index + HW, second.to(tl.int32), mask=pmask)


def check_routing_inputs(x, gate_bias, w_gate_x, w1, b1, w2, b2) -> tuple[int, int, int, int]:
    """One clear error for inputs either design cannot take; returns x's (B, C, H, W)."""
    check_activation(x)
    B, C, H, W = x.shape
    E, hidden = NUM_EXPERTS, w1.shape[1]
    shapes = {"gate_bias": (gate_bias, (B, E)), "w_gate_x": (w_gate_x, (C, E)), "w1": (w1, (E, hidden, C)),
              "b1": (b1, (E, hidden)), "w2": (w2, (E, C, hidden)), "b2": (b2, (E, C))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"spatial routing: {name} must be contiguous {list(shape)}, got {list(t.shape)}")
    if gate_bias.dtype != torch.float32 or w_gate_x.dtype != torch.float32:
        raise TypeError("spatial routing: the gating tensors must be float32")
    if w1.dtype != w2.dtype or w1.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"spatial routing: expert weights must share one dtype of float32, bfloat16, float16; "
                        f"got {w1.dtype}/{w2.dtype}")
    return B, C, H, W


def spatial_routing(x: torch.Tensor, gate_bias: torch.Tensor, w_gate_x: torch.Tensor,
                    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    return_topk: bool = False, out_dtype: torch.dtype | None = None):
    """SpatialRouting.forward(x, prompt) for NCHW x; output in `out_dtype` (default x's).

    gate_bias: fc(prompt) @ w_gate[C:], float32 [B, 4]; w_gate_x: w_gate[:C], float32 [C, 4];
    w1 [4, hidden, C], b1 [4, hidden], w2 [4, C, hidden], b2 [4, C]: the experts' fc1/fc2
    stacked (their matrix products run in w1/w2's dtype: float32, bfloat16 or float16).
    With return_topk, also the chosen experts, int32 [B, 2, H, W] (best first).
    """
    B, C, H, W = check_routing_inputs(x, gate_bias, w_gate_x, w1, b1, w2, b2)
    E, hidden = NUM_EXPERTS, w1.shape[1]
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    topk = torch.empty((B, 2, H, W), device=x.device, dtype=torch.int32) if return_topk else out
    block_c = max(16, triton.next_power_of_2(C))
    block_p = min(scaled(64 if block_c <= 64 else 32), max(16, triton.next_power_of_2(H * W)))
    block_h = min(scaled(64), max(16, triton.next_power_of_2(hidden)))
    grid = (B, triton.cdiv(H * W, block_p))
    _spatial_routing_kernel[grid](x, gate_bias, w_gate_x, w1, b1, w2, b2, out, topk, C, H * W, hidden,
                                  E=E, STORE_TOPK=return_topk, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_H=block_h,
                                  num_warps=4 if block_c <= 64 else 8, **mma_flags(w1.dtype))
    return (out, topk) if return_topk else out
