"""`export_aoti` / `medir-fast export --format aoti`: the package computes the eval model at any
batch and any multiple-of-8 size within its bounds, and bad input is one clear error."""

from __future__ import annotations

import numpy as np
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
    (("--weights", "{weights}", "-o", "{tmp}/m.onnx", "--format", "aoti"), "must end in .pt2"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--max-shape", "4x100x96"), "multiples of 8"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--max-shape", "0x96x96"), "batch must be >= 1"),
    (("--weights", "{weights}", "-o", "{tmp}/m.pt2", "--device", "tpu"), "unknown device"),
])
def test_cli_bad_input_is_one_line(tmp_path, tiny_weights, capsys, argv, message):
    assert main(["export", *(a.format(tmp=tmp_path, weights=tiny_weights) for a in argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medir-fast: error: ") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no package, no temporary


def test_aoti_backend_runs_the_package_like_eager_in_chunks_of_its_largest_batch(aoti_package, tiny_model):
    from medir_fast import Restorer

    fast = Restorer(tiny_model, "ct_denoise", engine=aoti_package, tile=0, batch_size=20)  # 20 > 16: two runs
    assert fast.backend.name == "aoti" and fast.dtype == torch.float32
    eager = Restorer(tiny_model, "ct_denoise", backend="eager", tile=0, batch_size=20)
    x = np.random.default_rng(3).uniform(-1100, 3200, (20, 37, 50)).astype(np.float32)
    np.testing.assert_allclose(fast.restore_slices(x), eager.restore_slices(x), rtol=0, atol=1e-5 * 4095)


def test_package_metadata_is_read_without_loading_it(aoti_package, tiny_model, capsys):
    from medir_fast.export.metadata import compiled_for, fits, read_metadata, settings

    meta = read_metadata(aoti_package)
    assert fits(meta, tiny_model, "aoti") is None
    assert settings(meta) == {"format": "aoti", "precision": "fp32", "device": compiled_for(torch.device("cpu")),
                              "profile": {"min": [1, 16, 16], "opt": [4, 256, 256], "max": [16, 256, 256]}}
    assert settings(meta)["device"]["isa"]  # the instruction set the C++ was generated for
    assert main(["info", str(aoti_package)]) == 0
    assert "format: medir-fast aoti 2" in capsys.readouterr().out


def test_a_package_for_another_cpu_is_refused(aoti_package, tiny_model, tmp_path):
    import json
    import zipfile

    from medir_fast import Restorer
    from medir_fast.export.metadata import EngineError

    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(aoti_package) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("metadata.json") and b"medir_fast.format" in data:
                meta = json.loads(data)
                meta["medir_fast.export"] = meta["medir_fast.export"].replace('"isa": "', '"isa": "other-')
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    with pytest.raises(EngineError, match=r"compiled for cpu \(other-"):
        Restorer(tiny_model, "ct_denoise", engine=other)


def test_cached_package_is_used_and_a_package_for_other_weights_is_refused(aoti_package, tiny_model, tmp_path,
                                                                          monkeypatch, capsys, tiny_weights):
    from medir_fast import Restorer
    from medir_fast.export import FORMATS
    from medir_fast.export.cache import engine_path

    monkeypatch.setenv("MEDIR_FAST_CACHE", str(tmp_path / "cache"))
    cached = engine_path(tiny_model, "aoti", "fp32", FORMATS["aoti"].profile, torch.device("cpu"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(aoti_package.read_bytes())  # as if a first run had compiled it
    monkeypatch.setattr("medir_fast.export.aoti.export_aoti", lambda *a, **k: pytest.fail("compiled again"))
    assert Restorer(tiny_model, "ct_denoise", backend="aoti").backend.engine == cached

    other = tmp_path / "other.pth"
    state = torch.load(tiny_weights, weights_only=True)
    state["output.weight"] = state["output.weight"] + 1e-3
    torch.save(state, other)
    from tests.conftest import write_nifti

    volume = write_nifti(tmp_path / "ct.nii.gz", np.zeros((24, 24, 3), np.float32))
    code = main(["infer", str(volume), "--task", "ct_denoise", "--weights", str(other), "--engine", str(aoti_package),
                 "-o", str(tmp_path / "out.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "built from other weights" in err[0], err
    assert not (tmp_path / "out.nii.gz").exists()
