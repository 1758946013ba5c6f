"""LayerNorm over channels (WithBias and BiasFree) vs medir_fast.model.amir.LayerNorm."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, SHAPES, assert_close, randomize_

from medir_fast.kernels.layernorm import add_layernorm, layernorm_channels
from medir_fast.model.amir import LayerNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["WithBias", "BiasFree"])
def test_layernorm_matches_reference(kind, shape, dtype):
    ref = randomize_(LayerNorm(shape[1], kind))
    # An offset mean: BiasFree keeps it, WithBias removes it; both must get it right.
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    expected = ref(x.float())
    actual = layernorm_channels(x, ref.body.weight, getattr(ref.body, "bias", None))
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_layernorm_float32_in_low_precision_out(out_dtype):
    ref = randomize_(LayerNorm(42, "WithBias"))
    x = torch.randn(2, 42, 9, 11, device=DEVICE)
    actual = layernorm_channels(x, ref.body.weight, ref.body.bias, out_dtype=out_dtype)
    assert_close(actual, ref(x), out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["WithBias", "BiasFree"])
def test_add_layernorm_matches_residual_then_norm(kind, shape, dtype):
    """float32 residual stream + a branch in `dtype` -> float32 sum and its norm in `dtype`."""
    ref = randomize_(LayerNorm(shape[1], kind))
    x = torch.randn(shape, device=DEVICE) * 2 + 0.5
    branch = torch.randn(shape, device=DEVICE).to(dtype)
    total, normed = add_layernorm(x, branch, ref.body.weight, getattr(ref.body, "bias", None), out_dtype=dtype)
    expected = x + branch.float()
    assert_close(total, expected, torch.float32)
    assert_close(normed, ref(expected), dtype)


def test_layernorm_rejects_channels_last():
    x = torch.randn(1, 8, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="contiguous NCHW"):
        layernorm_channels(x, torch.ones(8, device=DEVICE), None)
