"""Compiles every kernel for an NVIDIA Hopper GPU (sm_90) without one, at the tile sizes the
wrappers pick on a GPU for the default AMIR model, float32 and bfloat16. The interpreter accepts
programs the compiler rejects (layouts, dot shapes, types), so this catches those on a
CPU-only machine. Runs as its own process: TRITON_INTERPRET must be unset before import.

    python tests/kernels/compile_for_gpu.py    # prints one line per kernel, exit 1 on failure
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from medir_fast.kernels.channel_routing import _channel_routing_kernel  # noqa: E402
from medir_fast.kernels.dwconv import _dwconv3x3_kernel  # noqa: E402
from medir_fast.kernels.gdfn import _gdfn_gate_kernel  # noqa: E402
from medir_fast.kernels.layernorm import _layernorm_kernel  # noqa: E402
from medir_fast.kernels.mdta import _attn_v_kernel, _gram_kernel, _softmax_kernel  # noqa: E402
from medir_fast.kernels.spatial_routing import _spatial_routing_kernel  # noqa: E402
from medir_fast.kernels.spatial_routing_grouped import (  # noqa: E402
    _combine_kernel, _gating_kernel, _grouped_experts_kernel)

TARGET = GPUTarget("cuda", 90, 32)
# fp16 compiles through the same tensor-core path as bf16; checking one of them is enough.
DTYPES = ("fp32", "bf16")


def compile_kernel(fn, pointers: dict[str, str], constexprs: dict, num_warps: int = 4) -> None:
    """Arguments named in `pointers` are pointers of that element type, constexprs are
    compile-time values, every other argument a 32-bit integer."""
    signature = {name: "constexpr" if name in constexprs else f"*{pointers[name]}" if name in pointers else "i32"
                 for name in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET,
                   options={"num_warps": num_warps})


def cases():
    for dt in DTYPES:
        mma = dict(FP32_INPUTS=dt == "fp32", UPCAST=False)
        # LayerNorm / channel routing at C = 42 and 336 (the latent): [64 x 64] and [512 x 16] tiles.
        for block_c, block_p, warps in ((64, 64, 4), (512, 16, 8)):
            yield (f"add+layernorm {dt} C<={block_c}", _layernorm_kernel,
                   dict(x_ptr="fp32", branch_ptr=dt, sum_ptr="fp32", w_ptr="fp32", b_ptr="fp32", out_ptr=dt),
                   dict(ADD=True, WITH_BIAS=True, BLOCK_C=block_c, BLOCK_P=block_p), warps)
            yield (f"channel routing+norm {dt} C<={block_c}", _channel_routing_kernel,
                   dict(x_ptr=dt, logit_ptr="fp32", gamma_ptr="fp32", beta_ptr="fp32", out_ptr="fp32",
                        w_ptr="fp32", b_ptr="fp32", norm_ptr=dt),
                   dict(NORM=True, WITH_BIAS=False, BLOCK_C=block_c, BLOCK_P=block_p), warps)
        yield (f"dwconv3x3 {dt}", _dwconv3x3_kernel, dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, out_ptr=dt),
               dict(HAS_BIAS=False, BLOCK_C=8, BLOCK_P=256), 4)
        yield (f"gdfn gate {dt}", _gdfn_gate_kernel, dict(y_ptr=dt, w_ptr=dt, b_ptr=dt, out_ptr=dt),
               dict(HAS_BIAS=True, BLOCK_C=8, BLOCK_P=256), 4)
        yield (f"mdta gram {dt}", _gram_kernel, dict(qkv_ptr=dt, gram_ptr="fp32", norm_ptr="fp32"),
               dict(BLOCK_CH=64, BLOCK_N=64, **mma), 4)
        yield (f"mdta attn@v {dt}", _attn_v_kernel, dict(qkv_ptr=dt, attn_ptr="fp32", out_ptr=dt),
               dict(BLOCK_CH=64, BLOCK_N=64, **mma), 4)
        # Spatial routing at C = 42 (64-wide tiles, 4 warps) and C = 168 (256 wide, 8 warps).
        for block_c, block_p, warps in ((64, 64, 4), (256, 32, 8)):
            yield (f"spatial routing {dt} C<={block_c}", _spatial_routing_kernel,
                   dict(x_ptr=dt, gate_bias_ptr="fp32", wg_ptr="fp32", w1_ptr=dt, b1_ptr="fp32", w2_ptr=dt,
                        b2_ptr="fp32", out_ptr="fp32", topk_ptr="i32"),
                   dict(E=4, STORE_TOPK=True, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_H=64, **mma), warps)
            yield (f"spatial routing grouped: experts {dt} C<={block_c}", _grouped_experts_kernel,
                   dict(x_ptr=dt, rows_ptr="i64", tile_expert_ptr="i32", log_gates_ptr="fp32", w1_ptr=dt,
                        b1_ptr="fp32", w2_ptr=dt, b2_ptr="fp32", z_ptr="fp32"),
                   dict(BLOCK_M=block_p, BLOCK_C=block_c, BLOCK_H=64, **mma), warps)
        yield (f"spatial routing grouped: gating {dt}", _gating_kernel,
               dict(x_ptr=dt, gate_bias_ptr="fp32", wg_ptr="fp32", experts_ptr="i32", log_gates_ptr="fp32"),
               dict(E=4, BLOCK_P=64, BLOCK_C=64), 4)
        yield (f"spatial routing grouped: combine {dt}", _combine_kernel,
               dict(z_ptr="fp32", x_ptr=dt, out_ptr="fp32"), dict(BLOCK_P=64, BLOCK_C=64), 4)
    yield ("mdta softmax", _softmax_kernel, dict(gram_ptr="fp32", norm_ptr="fp32", temp_ptr="fp32",
                                                 attn_ptr="fp32"), dict(BLOCK_CH=64), 4)


def main() -> int:
    failed = 0
    for name, fn, pointers, constexprs, warps in cases():
        try:
            compile_kernel(fn, pointers, constexprs, warps)
            print(f"ok      {name}")
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            print(f"FAILED  {name}: " + " | ".join(lines[:4]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
