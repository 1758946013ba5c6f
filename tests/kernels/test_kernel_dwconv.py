"""Depth-wise 3x3 conv and the fused GDFN middle vs the amir.py modules."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, DTYPES, SHAPES, assert_close, randomize_

from medir_fast.kernels.dwconv import dwconv3x3
from medir_fast.kernels.gdfn import gdfn_gate
from medir_fast.model.amir import Attention, FeedForward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dwconv3x3_matches_qkv_dwconv(shape, dtype, bias):
    b, c, h, w = shape
    conv = randomize_(Attention(c, 1, bias)).qkv_dwconv
    x = torch.randn(b, 3 * c, h, w, device=DEVICE).to(dtype)
    actual = dwconv3x3(x, conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype))
    expected = conv(x.float())
    # The weights are rounded to the activation dtype too: one more rounding per tap.
    assert_close(actual, F.conv2d(x.float(), conv.weight.to(dtype).float(),
                                  None if conv.bias is None else conv.bias.to(dtype).float(), padding=1,
                                  groups=3 * c), dtype)
    assert_close(actual, expected, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gdfn_gate_matches_feedforward_middle(shape, dtype, bias):
    b, c, h, w = shape
    ffn = randomize_(FeedForward(c, 2.66, bias))
    hidden2 = ffn.dwconv.weight.shape[0]
    y = torch.randn(b, hidden2, h, w, device=DEVICE).to(dtype)
    x1, x2 = ffn.dwconv(y.float()).chunk(2, dim=1)
    expected = F.gelu(x1) * x2
    weight = ffn.dwconv.weight
    actual = gdfn_gate(y, weight, ffn.dwconv.bias)
    assert actual.shape == (b, hidden2 // 2, h, w)
    assert_close(actual, expected, dtype)


def test_gdfn_gate_odd_channel_count_is_an_error():
    with pytest.raises(ValueError, match="even channel count"):
        gdfn_gate(torch.randn(1, 5, 4, 4, device=DEVICE), torch.randn(5, 1, 3, 3, device=DEVICE))
