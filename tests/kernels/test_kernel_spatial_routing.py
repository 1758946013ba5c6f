"""Fused spatial routing (gating, top-2, two experts, log-space combination, residual)
vs amir.SpatialRouting, both designs: per-tile masked and grouped by expert."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, SHAPES, assert_close, randomize_

from medir_fast.backends.triton import pack_experts
from medir_fast.kernels.spatial_routing import spatial_routing
from medir_fast.kernels.spatial_routing_grouped import group_by_expert, spatial_routing_grouped
from medir_fast.model.amir import PROMPT_DIM, SpatialRouting

# Logit gaps below this count as ties: the top-2 choice there may go either way.
TIE = 1e-4
DESIGNS = pytest.mark.parametrize("routing", [spatial_routing, spatial_routing_grouped], ids=["masked", "grouped"])


def kernel_inputs(module: SpatialRouting, prompt: torch.Tensor, dtype: torch.dtype):
    c = module.fc.out_features
    gate_bias = (module.fc(prompt) @ module.moe.w_gate[c:]).float().contiguous()
    return dict(gate_bias=gate_bias, **pack_experts(module, dtype))


def reference(module: SpatialRouting, x: torch.Tensor, prompt: torch.Tensor):
    """(output, sorted gating logits [B, H, W, 4], top-2 indices [B, 2, H, W])."""
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c)
    gate_input = torch.cat([pixels, module.fc(prompt).repeat_interleave(h * w, dim=0)], dim=1)
    logits = gate_input @ module.moe.w_gate
    _, idx, _ = module.moe.gating(gate_input)
    out, _ = module(x, prompt)
    ranked = logits.sort(dim=1, descending=True).values.reshape(b, h, w, -1)
    return out, ranked, idx.reshape(b, h, w, 2).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@DESIGNS
def test_spatial_routing_matches_reference(shape, dtype, routing):
    b, c, h, w = shape
    module = randomize_(SpatialRouting(c, 2.66), std=0.3)
    prompt = torch.randn(b, PROMPT_DIM, device=DEVICE)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    with torch.no_grad():
        expected, ranked, ref_idx = reference(module, x.float(), prompt)
        actual, idx = routing(x, **kernel_inputs(module, prompt, dtype), return_topk=True)

    # The choice must match wherever it is decided: best vs second, and second vs third.
    first_decided = (ranked[..., 0] - ranked[..., 1]) > TIE
    second_decided = first_decided & ((ranked[..., 1] - ranked[..., 2]) > TIE)
    assert first_decided.float().mean() > 0.9, "test data should be mostly untied"
    assert torch.equal(idx[:, 0][first_decided], ref_idx[:, 0][first_decided])
    assert torch.equal(idx[:, 1][second_decided], ref_idx[:, 1][second_decided])
    # Output: only where the pair of experts is decided (a tie may legitimately swap experts).
    pair_decided = ((ranked[..., 1] - ranked[..., 2]) > TIE).unsqueeze(1).expand_as(actual)
    assert not actual.isnan().any()
    assert_close(actual[pair_decided], expected[pair_decided], dtype, scale=2)


@DESIGNS
def test_spatial_routing_one_expert_dominant(routing):
    """Huge logit gaps: the second gate underflows; the log-space combination stays finite."""
    b, c, h, w = 1, 8, 5, 7
    module = randomize_(SpatialRouting(c, 2.66), std=0.3)
    with torch.no_grad():
        module.moe.w_gate.mul_(200.0)
    prompt = torch.randn(b, PROMPT_DIM, device=DEVICE)
    x = torch.randn(b, c, h, w, device=DEVICE)
    with torch.no_grad():
        expected, _, _ = reference(module, x, prompt)
        actual = routing(x, **kernel_inputs(module, prompt, torch.float32))
    assert_close(actual, expected, torch.float32)


@DESIGNS
def test_spatial_routing_mixed_dtypes(routing):
    """bf16 activations in, bf16 expert products, float32 out (the backend's residual stream)."""
    b, c, h, w = 1, 12, 9, 7
    module = randomize_(SpatialRouting(c, 2.66), std=0.3)
    prompt = torch.randn(b, PROMPT_DIM, device=DEVICE)
    x = torch.randn(b, c, h, w, device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        expected, ranked, _ = reference(module, x.float(), prompt)
        actual = routing(x, **kernel_inputs(module, prompt, torch.bfloat16), out_dtype=torch.float32)
    assert ((ranked[..., 1] - ranked[..., 2]) > TIE).all()
    # float32 output, bf16 products inside: the bf16 tolerance applies.
    assert actual.dtype == torch.float32 and not actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=6e-2, rtol=2e-2)


@DESIGNS
def test_spatial_routing_rejects_mismatched_expert_dtypes(routing):
    module = randomize_(SpatialRouting(8, 2.66))
    prompt = torch.randn(1, PROMPT_DIM, device=DEVICE)
    inputs = kernel_inputs(module, prompt, torch.float32)
    inputs["w2"] = inputs["w2"].to(torch.bfloat16)
    with pytest.raises(TypeError, match="expert weights"):
        routing(torch.randn(1, 8, 4, 4, device=DEVICE), **inputs)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_group_by_expert_places_every_assignment_once(block_m):
    experts = torch.randint(0, 4, (2 * 37,), dtype=torch.int32, device=DEVICE)
    experts[:5] = 2  # an uneven split, and expert 3 may be absent
    rows, tile_expert = group_by_expert(experts, block_m)
    assert rows.numel() % block_m == 0 and tile_expert.numel() * block_m == rows.numel()
    assert rows.numel() < experts.numel() + 5 * block_m
    live = rows[rows >= 0]
    assert torch.equal(live.sort().values, torch.arange(experts.numel(), device=DEVICE))
    tiles = rows.view(-1, block_m)
    for t, e in zip(tiles, tile_expert):
        assert (experts[t[t >= 0]] == e).all(), "a tile mixes experts"
