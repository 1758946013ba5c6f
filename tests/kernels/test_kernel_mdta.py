"""MDTA attention (normalised q k^T, temperature, softmax, times v) vs amir.Attention."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, DTYPES, assert_close, randomize_

from medir_fast.kernels.dwconv import dwconv3x3
from medir_fast.kernels.mdta import mdta_attention
from medir_fast.model.amir import Attention

# (batch, channels, heads, height, width): C = 8, 12, 42 and 13, odd sizes; 42/2 = 21 per head;
# the last case is split into several pixel chunks (partial sums added by the softmax kernel).
CASES = [(1, 8, 1, 7, 9), (2, 12, 2, 5, 13), (1, 42, 2, 11, 6), (1, 13, 1, 9, 17), (1, 16, 4, 40, 24),
         (1, 8, 1, 40, 23)]


def reference_attention(attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """Attention.forward from after qkv_dwconv up to (not including) project_out."""
    b, c3, h, w = qkv.shape
    q, k, v = (t.reshape(b, attn.num_heads, c3 // 3 // attn.num_heads, h * w) for t in qkv.chunk(3, dim=1))
    scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * attn.temperature
    return (scores.softmax(dim=-1) @ v).reshape(b, c3 // 3, h, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_mdta_attention_matches_reference(case, dtype):
    b, c, heads, h, w = case
    attn = randomize_(Attention(c, heads, bias=False))
    with torch.no_grad():
        attn.temperature.uniform_(0.5, 3.0)
    qkv = torch.randn(b, 3 * c, h, w, device=DEVICE).to(dtype)
    expected = reference_attention(attn, qkv.float())
    actual = mdta_attention(qkv, attn.temperature, heads)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_module_through_kernels(dtype):
    """The whole MDTA: torch 1x1 convs around the depth-wise conv and attention kernels."""
    b, c, heads, h, w = 1, 12, 2, 9, 11
    attn = randomize_(Attention(c, heads, bias=True))
    x = torch.randn(b, c, h, w, device=DEVICE)
    expected = attn(x)
    qkv = F.conv2d(x.to(dtype).float(), attn.qkv.weight, attn.qkv.bias).to(dtype)
    qkv = dwconv3x3(qkv, attn.qkv_dwconv.weight, attn.qkv_dwconv.bias)
    actual = F.conv2d(mdta_attention(qkv, attn.temperature, heads).float(), attn.project_out.weight,
                      attn.project_out.bias).to(dtype)
    assert_close(actual, expected, dtype, scale=4)


def test_mdta_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads do not fit"):
        mdta_attention(torch.randn(1, 24, 4, 4, device=DEVICE), torch.ones(3, device=DEVICE), 3)
