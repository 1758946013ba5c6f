"""ONNX export (`medir-fast export --format onnx`) and the `onnxruntime` backend: parity with the
eager float32 model on every golden case and the shipped weights at batch 1 and 3 and odd sizes,
only ops TensorRT's ONNX parser takes, metadata that says what the file was built from, a cache
that is reused and refuses what does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medir_fast import Restorer, load_model
from medir_fast.cli import main

from .conftest import GOLDEN_CASES, golden

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from medir_fast.export import FORMATS  # noqa: E402
from medir_fast.export import cache  # noqa: E402
from medir_fast.export.metadata import fits, read_metadata, weights_sha256  # noqa: E402
from medir_fast.export.onnx import TENSORRT_OPS, export_onnx, unsupported_ops  # noqa: E402
from medir_fast.export.profile import ShapeProfile  # noqa: E402
from medir_fast.backends import onnxruntime as ort_backend  # noqa: E402

# ONNX Runtime and PyTorch run the same float32 graph with other kernels and summation orders.
REL_L2, MAX_ABS = 1e-5, 1e-4  # normalised units
SHAPES = [(1, 1, 40, 56), (3, 1, 24, 72)]  # batch 1 and 3, non-square, odd multiples of 8
PROFILE = ShapeProfile((1, 16, 16), (2, 64, 64), (64, 512, 512))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Each golden case exported once (tiny through the command line) and the shipped weights."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for case in GOLDEN_CASES:
        model, _ = golden(case)
        paths[case] = folder / f"{case}.onnx"
        if case == "tiny":
            weights = folder / "tiny.pth"
            torch.save(model.state_dict(), weights)
            assert main(["export", "--weights", str(weights), "-o", str(paths[case]), "--opt-shape", "2x64x64",
                         "--max-shape", "64x512x512"]) == 0
        else:
            export_onnx(model, paths[case], profile=PROFILE)
    paths["slim"] = export_onnx(load_model("slim"), folder / "slim.onnx", profile=PROFILE)
    return paths


def _cached_path(model):
    """Where the onnxruntime backend caches the fp32 engine of `model`."""
    return cache.engine_path(model, "onnx", "fp32", FORMATS["onnx"].profile, torch.device("cpu"))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    rel = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert rel <= REL_L2 and np.abs(actual - expected).max() <= MAX_ABS, (rel, np.abs(actual - expected).max())


@pytest.mark.parametrize("case", [*GOLDEN_CASES, "slim"])
def test_onnx_runtime_matches_eager_at_batch_1_and_3(engines, case):
    model = load_model("slim") if case == "slim" else golden(case)[0]
    session = _session(engines[case])
    for i, shape in enumerate(SHAPES):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            expected = model(x).numpy()
        _close(session.run(["restored"], {"image": x.numpy()})[0], expected)
    if case != "slim":  # and the official outputs of the golden inputs
        _, io = golden(case)
        for x, official in zip(io["inputs"], io["outputs"]):
            _close(session.run(["restored"], {"image": x.numpy()})[0], official.numpy())


@pytest.mark.parametrize("case", [*GOLDEN_CASES, "slim"])
def test_graph_has_only_what_tensorrt_takes(engines, case):
    proto = onnx.load(str(engines[case]))
    assert proto.opset_import[0].version >= 18
    assert {n.op_type for n in proto.graph.node} <= TENSORRT_OPS
    assert unsupported_ops(proto) == []
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1)  # batch, height and width dynamic


def test_the_check_can_fail():
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("NonZero", ["x"], ["y"], name="nz"),
         onnx.helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0),
         onnx.helper.make_node("LayerNormalization", ["x", "s"], ["n", "mean"], name="ln"),
         onnx.helper.make_node("Add", ["mean", "x"], ["z"], name="add")],
        "g", [], []))
    assert unsupported_ops(proto) == ["op NonZero (nz)", "TopK with sorted=0 (topk)",
                                      "LayerNormalization with its mean or inverse std used (ln)"]


def test_metadata_says_what_the_file_was_built_from(engines):
    meta = read_metadata(engines["slim"])
    model = load_model("slim")
    assert json.loads(meta["medir_fast.config"]) == json.loads(json.dumps(model.config))
    assert meta["medir_fast.weights_sha256"] == weights_sha256(model)
    assert json.loads(meta["medir_fast.tiles"]) == {"ct_denoise": 80, "mri_sr": 128, "pet_synthesis": 64}
    assert json.loads(meta["medir_fast.tasks"])["ct_denoise"] == [-1024.0, 3071.0]
    assert json.loads(meta["medir_fast.export"]) == {"format": "onnx", "opset": 18, "precision": "fp32",
                                                     "profile": PROFILE.as_dict()}


def test_backend_runs_the_cached_engine_and_matches_eager(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIR_FAST_CACHE", str(tmp_path))
    model = load_model("slim")
    cached = _cached_path(model)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(engines["slim"].read_bytes())  # as if a first run had exported it
    monkeypatch.setattr("medir_fast.export.onnx.export_onnx", lambda *a, **k: pytest.fail("exported again"))
    slices = np.random.default_rng(0).uniform(-1024, 1500, (3, 61, 70)).astype(np.float32)
    fast = Restorer(model, "ct_denoise", backend="onnxruntime", batch_size=2)
    assert fast.backend.name == "onnxruntime" and fast.backend.engine == cached
    eager = Restorer(model, "ct_denoise", backend="eager", batch_size=2)
    np.testing.assert_allclose(fast.restore_slices(slices), eager.restore_slices(slices), rtol=0, atol=1e-4 * 4095)


def test_an_engine_that_does_not_fit_is_refused(engines):
    tiny, _ = golden("tiny")
    assert fits(read_metadata(engines["tiny"]), tiny, "onnx") is None
    assert fits(read_metadata(engines["biased"]), tiny, "onnx") == "built for another AMIR config"
    assert fits(read_metadata(engines["tiny"]), tiny, "onnx", "fp16") == "built for fp32, not fp16"
    assert fits(read_metadata(engines["tiny"]), tiny, "aoti") == "a medir-fast onnx 2 file, not a medir-fast aoti engine"
    other = golden("tiny")[0]
    with torch.no_grad():
        other.output.weight.add_(1e-3)
    assert fits(read_metadata(engines["tiny"]), other, "onnx") == "built from other weights"


def test_unavailable_reasons_are_plain():
    assert "bfloat16" in ort_backend.unavailable_reason(torch.device("cpu"), torch.bfloat16)
    assert ort_backend.unavailable_reason(torch.device("cpu"), torch.float32) is None


def test_infer_runs_a_given_engine_and_refuses_one_that_does_not_fit(engines, tmp_path, capsys, ct_volume):
    weights = engines["tiny"].parent / "tiny.pth"
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(engines["tiny"].read_bytes()[:5000])
    base = ["infer", str(ct_volume), "--task", "ct_denoise", "--weights", str(weights), "--tile", "0"]
    assert main([*base, "-o", str(tmp_path / "eager.nii.gz"), "--backend", "eager"]) == 0
    assert main([*base, "-o", str(tmp_path / "ort.nii.gz"), "--engine", str(engines["tiny"])]) == 0
    import nibabel as nib

    np.testing.assert_allclose(nib.load(tmp_path / "ort.nii.gz").get_fdata(), nib.load(tmp_path / "eager.nii.gz").get_fdata(),
                               rtol=0, atol=1e-4 * 4095)
    capsys.readouterr()
    for engine, extra, message in [(engines["biased"], [], "built for another AMIR config"),
                                   (truncated, [], "damaged or not a .onnx engine"),
                                   (tmp_path / "none.onnx", [], "not found"),
                                   (engines["tiny"], ["--backend", "eager"], "runs with the onnxruntime backend")]:
        before = sorted(p.name for p in tmp_path.iterdir())
        code = main([*base, "-o", str(tmp_path / "x.nii.gz"), "--engine", str(engine), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_info_prints_what_an_engine_was_built_from(engines, capsys):
    assert main(["info", str(engines["slim"])]) == 0
    out = capsys.readouterr().out
    assert "weights_sha256: " in out and '"max": [64, 512, 512]' in out and "format: medir-fast onnx 2" in out


def test_many_tiles_run_in_chunks_of_the_engines_largest_batch(engines):
    """A 296 x 296 slice in 16 x 16 tiles, 4 slices' worth of pixels per call: 342 tiles per call,
    more than the engine's largest batch (64): run in chunks, same result as eager."""
    tiny, _ = golden("tiny")
    fast = Restorer(tiny, "ct_denoise", engine=engines["tiny"], batch_size=4, tile=16)
    eager = Restorer(tiny, "ct_denoise", backend="eager", batch_size=4, tile=16)
    x = np.random.default_rng(1).uniform(0, 1, (1, 296, 296)).astype(np.float32)
    np.testing.assert_allclose(fast.restore_normalized(x), eager.restore_normalized(x), rtol=0, atol=1e-4)


def test_a_stale_cached_engine_is_rebuilt_never_run(engines, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MEDIR_FAST_CACHE", str(tmp_path))
    tiny, _ = golden("tiny")
    cached = _cached_path(tiny)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(engines["biased"].read_bytes())  # another model's engine under this key
    built = []
    monkeypatch.setattr("medir_fast.export.onnx.export_onnx",
                        lambda model, path, **k: built.append(path) or path.write_bytes(engines["tiny"].read_bytes()))
    assert Restorer(tiny, "ct_denoise", backend="onnxruntime").backend.engine == cached
    assert len(built) == 1 and "building it again" in caplog.text
    assert fits(read_metadata(cached), tiny, "onnx") is None


@pytest.mark.parametrize("content", [b"not onnx at all", None], ids=["not onnx", "onnx without our metadata"])
def test_info_on_a_file_that_is_not_our_engine_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "x.onnx"
    if content is None:
        onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(path))
    else:
        path.write_bytes(content)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("damaged or not a .onnx engine" in err[0] or "no medir-fast metadata" in err[0])


def test_auto_picks_onnxruntime_on_the_cpu_and_says_so(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="medir_fast")
    tiny, _ = golden("tiny")
    assert Restorer(tiny, "ct_denoise").backend.name == "onnxruntime"
    assert "backend onnxruntime on cpu" in caplog.text
    assert Restorer(torch.nn.Identity(), "ct_denoise").backend.name == "eager"  # not an AMIR: no engine
    assert "skipping backend onnxruntime (it runs AMIR models only)" in caplog.text
