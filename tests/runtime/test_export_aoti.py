"""`export_aoti` / `medir-fast export --format aoti`: the package computes the eval model at any
batch and any multiple-of-8 size within its bounds, and bad input is one clear error."""

from __future__ import annotations

import argparse

import pytest
import torch

from medir_fast.export import aoti


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (3, 1, 48, 64), (2, 1, 40, 24), (16, 1, 24, 32)])
def test_package_matches_the_eval_model(aoti_package, tiny_model, shape):
    run = torch._inductor.aoti_load_package(str(aoti_package))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        want = tiny_model(x)
    got = run(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fp32, normalised space


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    aoti.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv,message", [
    (("--weights", "{tmp}/missing.pth", "-o", "{tmp}/m.pt2"), "weights file not found"),
    (("--weights", "{weights}", "-o", "{tmp}/m.onnx"), "must end in .pt2"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--max-side", "100"), "multiple of 8"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--max-batch", "0"), "max batch"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--device", "tpu"), "unknown device"),
])
def test_cli_bad_input_is_one_line(tmp_path, tiny_weights, capsys, argv, message):
    args = _parse(*(a.format(tmp=tmp_path, weights=tiny_weights) for a in argv))
    assert aoti.run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "m.pt2").exists()
