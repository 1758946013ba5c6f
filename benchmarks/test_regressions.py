"""Regression benchmarks with pytest-benchmark: every backend that runs here on the shipped
`slim` weights, and on CUDA each Triton kernel and the PyTorch ops it replaces. Not part of the
test suite (CI runs tests/); run it on one machine at two commits and compare:

    .venv/bin/python -m pytest benchmarks/ --benchmark-autosave          # saves .benchmarks/<machine>/NNNN_<commit>.json
    .venv/bin/python -m pytest benchmarks/ --benchmark-compare           # against the last saved run
    .venv/bin/python -m pytest benchmarks/ --benchmark-compare=0001 --benchmark-compare-fail=median:10%

`medir-fast bench` is the command for comparing backends with each other on one machine; this
suite is for comparing one commit with another.
"""

from __future__ import annotations

import pytest
import torch

from medir_fast import load_model
from medir_fast.bench import DEFAULTS
from medir_fast.bench.candidates import ALL, CLASSICAL, NETWORK_BASELINES, build, skip_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (1, 1, 256, 256) if DEVICE.type == "cpu" else (8, 1, 256, 256)
NETWORKS = [name for name in ALL if name not in CLASSICAL]


def precision(name: str) -> str:
    """bf16 for medir-fast's backends on CUDA; fp32 on the CPU and for the official algorithm
    (which fails under autocast on CUDA)."""
    return "bf16" if DEVICE.type == "cuda" and name not in NETWORK_BASELINES else "fp32"


@pytest.fixture(scope="module")
def model():
    return load_model("slim")


@pytest.mark.parametrize("name", NETWORKS)
def test_backend(benchmark, model, name):
    chosen = precision(name)
    reason = DEFAULTS[DEVICE.type]["left_out"].get(name) or skip_reason(name, model, DEVICE, chosen, "ct_denoise")
    if reason is not None:
        pytest.skip(f"{name} {chosen} on {DEVICE}: {reason}")
    call, _ = build(name, model, DEVICE, chosen, 0, "ct_denoise", SHAPE[0])
    x = torch.rand(*SHAPE, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run():
        out = call(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # builds, compiles, captures graphs: not part of the timing
    benchmark.extra_info.update(shape="x".join(map(str, SHAPE[:1] + SHAPE[2:])), precision=chosen,
                                device=str(DEVICE), threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=10 if DEVICE.type == "cpu" else 50, warmup_rounds=1)


def _kernel_cases():
    if DEVICE.type != "cuda":
        return [pytest.param(None, marks=pytest.mark.skip(reason="the Triton kernels are timed on CUDA only"),
                             id="no-cuda")]
    from bench_kernels import cases

    return [pytest.param(case, id=case[0].replace(" ", "-")) for case in cases()]


@pytest.mark.parametrize("case", _kernel_cases())
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_kernel(benchmark, case, impl):
    name, kernel, reference, _ = case
    fn = kernel if impl == "triton" else reference

    def run():
        fn()
        torch.cuda.synchronize()

    with torch.inference_mode():
        run()
        benchmark.pedantic(run, rounds=100, warmup_rounds=5)
