"""Spatial routing, grouped design: the (pixel, expert) assignments sorted by expert, one grouped GEMM.

The per-tile masked design (`spatial_routing.py`) runs an expert on a whole tile as soon as one
of its pixels chose it; when choices are mixed that is up to twice the top-2 work. This design
does exactly the top-2 work, at the price of a sort and a gather:
1. `_gating_kernel`: per pixel the top-2 experts and their log gates (the same `top2_gates`).
2. On the device, no host sync: the 2N assignments (N = B*H*W) sorted by expert (stable), each
   expert's run padded to a multiple of BLOCK_M so that every tile holds one expert only. The
   padded list has a fixed size, about 2N + 4*BLOCK_M (padding entries are -1), so shapes never
   depend on the data and the whole thing can be captured in a CUDA graph.
3. `_grouped_experts_kernel`: per tile, gather the pixels' features, run the tile's expert, add
   the log gate, write z[pixel, rank] (float32 [N, 2, C]: two results per pixel, never four).
4. `_combine_kernel`: y = log(exp(z0) + exp(z1)) + x, stably, back into NCHW.
Kept beside the masked design until a GPU measurement picks one (benchmarks/bench_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import mma_flags, pixel_block, scaled
from .spatial_routing import NUM_EXPERTS, check_routing_inputs, expert_mlp, top2_gates


@triton.jit
def _gating_kernel(x_ptr, gate_bias_ptr, wg_ptr, experts_ptr, log_gates_ptr, C, HW,
                   E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    pmask = offs_p < HW
    x = tl.load(x_ptr + b.to(tl.int64) * C * HW + offs_c[None, :] * HW + offs_p[:, None],
                mask=pmask[:, None] & cmask[None, :], other=0.0)
    first, second, log_g1, log_g2 = top2_gates(x.to(tl.float32), wg_ptr, gate_bias_ptr, b, offs_c, cmask, E, BLOCK_P)
    assignment = (b.to(tl.int64) * HW + offs_p) * 2  # [pixel, rank] flattened, rank 0 = best
    tl.store(experts_ptr + assignment, first.to(tl.int32), mask=pmask)
    tl.store(experts_ptr + assignment + 1, second.to(tl.int32), mask=pmask)
    tl.store(log_gates_ptr + assignment, log_g1, mask=pmask)
    tl.store(log_gates_ptr + assignment + 1, log_g2, mask=pmask)


@triton.jit
def _grouped_experts_kernel(x_ptr, rows_ptr, tile_expert_ptr, log_gates_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, z_ptr,
                            C, HW, HIDDEN,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                            FP32_INPUTS: tl.constexpr, UPCAST: tl.constexpr):
    tile = tl.program_id(0)
    assignment = tl.load(rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))  # -1 = padding
    live = assignment >= 0
    if tl.sum(live.to(tl.int32)) > 0:
        e = tl.load(tile_expert_ptr + tile)
        pixel = tl.where(live, assignment // 2, 0)
        b, p = pixel // HW, pixel % HW
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        mask = live[:, None] & cmask[None, :]
        x = tl.load(x_ptr + b[:, None] * C * HW + offs_c[None, :] * HW + p[:, None], mask=mask, other=0.0)
        out_e = expert_mlp(x, e, w1_ptr, b1_ptr, w2_ptr, b2_ptr, offs_c, cmask, C, HIDDEN,
                           BLOCK_M, BLOCK_C, BLOCK_H, FP32_INPUTS, UPCAST)
        log_gate = tl.load(log_gates_ptr + assignment, mask=live, other=0.0)
        tl.store(z_ptr + assignment[:, None] * C + offs_c[None, :], out_e + log_gate[:, None], mask=mask)


@triton.jit
def _combine_kernel(z_ptr, x_ptr, out_ptr, C, HW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_p[:, None] < HW) & (offs_c[None, :] < C)
    rows = (b.to(tl.int64) * HW + offs_p[:, None]) * 2 * C + offs_c[None, :]
    z1 = tl.load(z_ptr + rows, mask=mask, other=0.0)
    z2 = tl.load(z_ptr + rows + C, mask=mask, other=0.0)
    offsets = b.to(tl.int64) * C * HW + offs_c[None, :] * HW + offs_p[:, None]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    top = tl.maximum(z1, z2)
    y = top + tl.log(tl.exp(z1 - top) + tl.exp(z2 - top)) + x
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def group_by_expert(experts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment ids sorted by expert, each expert's run padded to a multiple of block_m with -1.

    experts: int32 [2N], the expert of each assignment. Returns (rows int64 [about 2N + E*block_m,
    a multiple of block_m], tile_expert int32 [len(rows) // block_m]); on the device, sizes fixed by N.
    """
    n, e = experts.numel(), NUM_EXPERTS
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    sorted_experts = experts[order].long()
    # Sorted position j of expert k lands at padded_start[k] + (j - start[k]).
    shift = (padded_end - padded) - (counts.cumsum(0) - counts)
    size = triton.cdiv(n + e * (block_m - 1), block_m) * block_m  # the most the padded runs can need
    rows = torch.full((size,), -1, dtype=torch.int64, device=experts.device)
    rows[torch.arange(n, device=experts.device) + shift[sorted_experts]] = order
    tile_start = torch.arange(0, rows.numel(), block_m, device=experts.device)
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True).clamp(max=e - 1).to(torch.int32)
    return rows, tile_expert


def spatial_routing_grouped(x: torch.Tensor, gate_bias: torch.Tensor, w_gate_x: torch.Tensor,
                            w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                            return_topk: bool = False, out_dtype: torch.dtype | None = None):
    """The same contract as `spatial_routing` (same arguments, same result), grouped design."""
    B, C, H, W = check_routing_inputs(x, gate_bias, w_gate_x, w1, b1, w2, b2)
    hidden, hw = w1.shape[1], H * W
    block_c = max(16, triton.next_power_of_2(C))
    block_p = pixel_block(block_c, hw)
    experts = torch.empty(B * hw * 2, device=x.device, dtype=torch.int32)
    log_gates = torch.empty(B * hw * 2, device=x.device, dtype=torch.float32)
    grid = (B, triton.cdiv(hw, block_p))
    _gating_kernel[grid](x, gate_bias, w_gate_x, experts, log_gates, C, hw,
                         E=NUM_EXPERTS, BLOCK_P=block_p, BLOCK_C=block_c)

    block_m = scaled(64 if block_c <= 64 else 32)
    block_h = min(scaled(64), max(16, triton.next_power_of_2(hidden)))
    rows, tile_expert = group_by_expert(experts, block_m)
    z = torch.empty(B * hw * 2, C, device=x.device, dtype=torch.float32)
    _grouped_experts_kernel[(tile_expert.numel(),)](x, rows, tile_expert, log_gates, w1, b1, w2, b2, z, C, hw, hidden,
                                                     BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_H=block_h,
                                                     num_warps=4 if block_c <= 64 else 8, **mma_flags(w1.dtype))
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    _combine_kernel[grid](z, x, out, C, hw, BLOCK_P=block_p, BLOCK_C=block_c)
    if not return_topk:
        return out
    return out, experts.view(B, H, W, 2).permute(0, 3, 1, 2).contiguous()
