"""Pieces every kernel file shares: the matrix-multiply helper and launch-size rules."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's CPU interpreter runs each program in numpy: fewer, larger programs are much faster
# there, while the GPU wants tiles that fit in registers. Under the interpreter tiles are this
# many times larger; the kernel tests set it to 1 to run the GPU's tiles and tile boundaries.
INTERPRET_TILE_SCALE = 16

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def mma(a, b, acc, FP32_INPUTS: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    float32 operands use IEEE products (the float32 path is the accuracy path, no TF32).
    UPCAST (set only under the interpreter, for bfloat16) multiplies in float32 from the same
    rounded operands: the interpreter's dot is wrong for bfloat16 (Triton 3.9 hands numpy the
    raw uint16 bits). On the GPU bfloat16 takes the tensor-core path like float16.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_INPUTS:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def gelu(x):
    """Exact (erf) GELU, as torch's default."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


def mma_flags(dtype: torch.dtype) -> dict:
    return dict(FP32_INPUTS=dtype == torch.float32, UPCAST=INTERPRET and dtype == torch.bfloat16)


def check_activation(x: torch.Tensor, name: str = "x") -> None:
    """One clear error for what the kernels do not take (they index NCHW memory directly)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (float32, bfloat16, float16)")
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous NCHW tensor, got shape {tuple(x.shape)}")


def scaled(n: int) -> int:
    """A GPU tile size, enlarged under the interpreter (see INTERPRET_TILE_SCALE)."""
    return n * INTERPRET_TILE_SCALE if INTERPRET else n


def warps_for(tile_elements: int) -> int:
    """Warps per program: 4 up to 4096 tile elements (32 per thread), 8 above."""
    return 4 if tile_elements <= 4096 else 8


def pixel_block(channels_block: int, pixels: int) -> int:
    """Pixels per program so that a [channels, pixels] tile holds about 4096 elements."""
    return max(16, min(scaled(1024), scaled(4096) // channels_block, triton.next_power_of_2(pixels)))
