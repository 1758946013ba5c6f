"""Channel routing (alone and fused with the next LayerNorm) vs amir.ChannelRouting."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, SHAPES, assert_close, randomize_

from medir_fast.kernels.channel_routing import channel_routing
from medir_fast.model.amir import PROMPT_DIM, ChannelRouting, LayerNorm


def _case(shape, dtype):
    route = randomize_(ChannelRouting(shape[1]), std=0.5)
    prompt = torch.randn(shape[0], PROMPT_DIM, device=DEVICE)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    return route, prompt, x, route.fc(prompt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_routing_matches_reference(shape, dtype):
    route, prompt, x, logits = _case(shape, dtype)
    actual = channel_routing(x, logits, route.gamma, route.beta)
    assert_close(actual, route(x.float(), prompt), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["WithBias", "BiasFree"])
def test_channel_routing_fused_layernorm(shape, dtype, kind):
    route, prompt, x, logits = _case(shape, dtype)
    norm = randomize_(LayerNorm(shape[1], kind))
    routed, normed = channel_routing(x, logits, route.gamma, route.beta, norm.body.weight,
                                     getattr(norm.body, "bias", None))
    expected = route(x.float(), prompt)
    assert_close(routed, expected, dtype)
    # The norm reads the routed tensor as stored, so compare against the norm of that.
    assert_close(normed, norm(routed.float()), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_routing_float32_residual_low_precision_norm(dtype):
    """Low-precision x in, float32 routed tensor (residual stream), low-precision norm out."""
    route, prompt, x, logits = _case((1, 42, 7, 9), dtype)
    norm = randomize_(LayerNorm(42, "WithBias"))
    routed, normed = channel_routing(x, logits, route.gamma, route.beta, norm.body.weight, norm.body.bias,
                                     out_dtype=torch.float32, norm_dtype=dtype)
    expected = route(x.float(), prompt)
    assert_close(routed, expected, torch.float32)
    assert_close(normed, norm(expected), dtype)
