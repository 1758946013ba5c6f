"""`export_aoti` / `medir-fast export --format aoti`: the package computes the eval model at any
batch and any multiple-of-8 size within its bounds, and bad input is one clear error."""

from __future__ import annotations

import pytest
import torch

from medir_fast.cli import main


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (3, 1, 48, 64), (2, 1, 40, 24), (16, 1, 24, 32)])
def test_package_matches_the_eval_model(aoti_package, tiny_model, shape):
    run = torch._inductor.aoti_load_package(str(aoti_package))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        want = tiny_model(x)
    got = run(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fp32, normalised space


@pytest.mark.parametrize("argv,message", [
    (("--weights", "{tmp}/missing.pth", "-o", "{tmp}/m.pt2"), "weights file not found"),
    (("--weights", "{weights}", "-o", "{tmp}/m.onnx"), "must end in .pt2"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--max-side", "100"), "multiple of 8"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--max-batch", "0"), "max batch"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--device", "tpu"), "unknown device"),
])
def test_cli_bad_input_is_one_line(tmp_path, tiny_weights, capsys, argv, message):
    assert main(["export", *(a.format(tmp=tmp_path, weights=tiny_weights) for a in argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medir-fast: error: ") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no package, no temporary
