"""The AMIR model against the official implementation's golden outputs and semantics."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medir_fast.model import AMIR, DEFAULT_CONFIG, infer_config
from medir_fast.bench.official import OfficialMoE, as_official, official_model
from medir_fast.model.amir import MoE

from .conftest import DATA, GOLDEN_CASES, golden

PARITY_TOL = 1e-5  # max abs error, fp32 on the CPU, against the official outputs


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_outputs_and_intermediates(case):
    model, io = golden(case)
    for x, expected, intermediates in zip(io["inputs"], io["outputs"], io["intermediates"]):
        seen = {}
        hooks = [getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o))
            for name in intermediates]
        with torch.no_grad():
            out = model(x)
        for h in hooks:
            h.remove()
        assert (out - expected).abs().max() <= PARITY_TOL
        for name, value in intermediates.items():
            assert (seen[name] - value).abs().max() <= PARITY_TOL, name


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_official_algorithm_gives_the_golden_outputs_by_sparse_dispatch(case):
    """The bench's `official` baseline: the golden outputs, computed with the official host syncs."""
    model, io = golden(case)
    official = official_model(model)
    ops = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        for x, expected in zip(io["inputs"], io["outputs"]):
            assert (official(x) - expected).abs().max() <= PARITY_TOL
        with Record():
            official(io["inputs"][0])
    assert sum("nonzero" in op for op in ops) == 2 * 3  # twice per routed level
    assert sum("aten.sort" in op for op in ops) == 3
    assert model.training is False and all(not m.training for m in official.modules())


def test_default_config_keys_and_shapes_match_official():
    rows = (DATA / "amir_default_state_dict_keys.tsv").read_text().strip().splitlines()[1:]
    official = {k: tuple(int(d) for d in s.strip("()").split(",") if d.strip()) for k, s in (r.split("\t") for r in rows)}
    ours = {k: tuple(v.shape) for k, v in AMIR().state_dict().items()}
    assert ours == official
    assert sum(p.numel() for p in AMIR().parameters()) == 23_540_498


def sparse_dispatch(moe: MoE) -> OfficialMoE:
    """The same experts and gate, computed as the official code does (nonzero / sort / split, exp then log)."""
    return as_official(copy.deepcopy(moe))


@pytest.mark.parametrize("dim,ffn", [(8, 2.66), (12, 2.0), (42, 2.66), (13, 1.5)])
def test_dense_gather_routing_matches_sparse_dispatch(dim, ffn):
    torch.manual_seed(dim)
    moe = MoE(dim, int(dim * ffn)).eval().double()
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(500, dim, dtype=torch.float64)
    gate_input = torch.cat([x, torch.randn(1, dim, dtype=torch.float64).expand(500, -1)], dim=1)
    ours, loss = moe(x, gate_input)
    assert loss == 0
    torch.testing.assert_close(ours, sparse_dispatch(moe)(x, gate_input)[0], rtol=1e-12, atol=1e-12)


def test_log_space_combination_is_stable_where_official_underflows():
    moe = MoE(4, 8).eval().double()
    with torch.no_grad():
        for e in moe.experts:
            e.fc2.bias.fill_(-800.0)  # exp(-800) underflows to 0 even in float64
    x = torch.randn(10, 4, dtype=torch.float64)
    out, _ = moe(x, torch.cat([x, x], 1))
    assert torch.isfinite(out).all() and (out < -700).all()
    official = sparse_dispatch(moe)(x, torch.cat([x, x], 1))[0]
    assert torch.allclose(official, torch.log(torch.tensor(torch.finfo(torch.float64).eps, dtype=torch.float64)))


OTHER_CONFIGS = [
    dict(dim=8, num_blocks=[1, 2, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4]),
    dict(dim=12, num_blocks=[1, 1, 1, 1], num_refinement_blocks=0, ffn_expansion_factor=2.0, bias=True),
    dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, LayerNorm_type="BiasFree"),
    dict(dim=10, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2], ffn_expansion_factor=1.5),
]


@pytest.mark.parametrize("config", OTHER_CONFIGS)
def test_other_configs_run_and_round_trip_their_config(config):
    torch.manual_seed(0)
    model = AMIR(**config).eval()
    full = {**DEFAULT_CONFIG, **config}
    assert infer_config(model.state_dict()) == full
    x = torch.rand(2, 1, 24, 40)
    with torch.no_grad():
        out = model(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the batch is independent: each image alone gives the same result
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-5, atol=1e-5)
        # float64 reference of the same module: the fp32 forward is numerically sound
        ref = copy.deepcopy(model).double()(x.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_training_mode_returns_load_balancing_loss_and_trains():
    torch.manual_seed(0)
    model = AMIR(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1).train()
    x = torch.rand(2, 1, 32, 32)
    out, loss = model(x)
    assert out.shape == x.shape and loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    (F.l1_loss(out, x) + 1e-3 * loss).backward()
    assert model.spatial_routing_encoder_level1.moe.w_noise.grad.abs().sum() > 0  # noise path is trained
    assert model.spatial_routing_encoder_level1.moe.w_gate.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)


# Relative L2 error of autocast runs against the fp32 output, per golden case. fp16 stays under
# 5e-3 everywhere. bf16 (8 mantissa bits) cannot on `small`: its seeded-noise weights amplify
# rounding so much that rounding only the *input* to bf16, all else fp32, already moves the output
# by 1.3e-2 (see test_golden_weights_amplify_rounding); bf16 there measured 8.7e-3 and 1.8e-2
# (2026-11-26, this CPU) and is held to 3e-2.
LOW_PRECISION_TOL = {("tiny", torch.float16): 5e-3, ("tiny", torch.bfloat16): 5e-3,
                     ("small", torch.float16): 5e-3, ("small", torch.bfloat16): 3e-2,
                     ("biased", torch.float16): 5e-3, ("biased", torch.bfloat16): 5e-3,
                     ("biasfree", torch.float16): 5e-3, ("biasfree", torch.bfloat16): 5e-3}


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_runs_and_stays_close(case, dtype):
    model, io = golden(case)
    for x, expected in zip(io["inputs"], io["outputs"]):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert out.dtype == torch.float32
        rel = ((out - expected).norm() / expected.norm()).item()
        assert rel <= LOW_PRECISION_TOL[(case, dtype)], rel


def test_golden_weights_amplify_rounding():
    model, io = golden("small")
    x, expected = io["inputs"][0], io["outputs"][0]
    with torch.no_grad():
        out = model(x.bfloat16().float())
    assert ((out - expected).norm() / expected.norm()).item() > 5e-3


def test_eval_forward_exports_with_dynamic_batch_height_width(tiny_model):
    batch = torch.export.Dim("batch", min=1, max=16)
    h8, w8 = torch.export.Dim("h8", min=2, max=128), torch.export.Dim("w8", min=2, max=128)
    exported = torch.export.export(tiny_model, (torch.rand(2, 1, 32, 48),),
                                   dynamic_shapes={"inp_img": {0: batch, 2: 8 * h8, 3: 8 * w8}})
    x = torch.rand(3, 1, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), tiny_model(x), rtol=1e-5, atol=1e-5)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("nonzero" in t or "_local_scalar_dense" in t for t in targets)


def test_every_shared_golden_case_is_in_the_tests():
    """tests/data holds a byte-identical copy of every case of the shared reference data."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / "amir"
    if not shared.is_dir():
        pytest.skip(f"no shared reference folder at {shared}")
    cases = json.loads((shared / "manifest.json").read_text())
    assert sorted(cases) == GOLDEN_CASES
    for case in cases:
        for name in (f"{case}_state_dict.pth", f"{case}_io.pt"):
            assert (DATA / name).read_bytes() == (shared / name).read_bytes(), name


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_config_is_read_off_the_official_checkpoint(case):
    """Every official constructor option (bias, LayerNorm_type, heads, ffn) is recovered from the keys."""
    expected = json.loads((DATA / "manifest.json").read_text())[case]["config"]
    assert infer_config(torch.load(DATA / f"{case}_state_dict.pth", weights_only=True)) == expected
