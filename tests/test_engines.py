"""Engines across formats: shape profiles, fp16 ONNX engines, the TensorRT container and the
plain parts of the TensorRT path (no machine here has TensorRT: it must say so in one line),
and slices outside an engine's profile refused in one line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_fast import Restorer
from medir_fast.backends import BACKENDS, unavailable_reason
from medir_fast.cli import main
from medir_fast.export import FORMATS, export
from medir_fast.export.metadata import EngineError, describe, read_metadata, settings
from medir_fast.export.profile import DEFAULT_PROFILE, ShapeProfile, parse_shape
from medir_fast.export.tensorrt import profile_shapes, read_container, write_container
from medir_fast.model.amir import cast_backbone

from .conftest import DATA, golden

SMALL = ShapeProfile((1, 16, 16), (2, 64, 64), (4, 128, 128))


def test_shape_profile_bounds_and_chunks():
    assert parse_shape("4x512X256") == (4, 512, 256)
    for bad in ("4x512", "axbxc", "4x512x256x1", ""):
        with pytest.raises(ValueError, match="BATCHxHEIGHTxWIDTH"):
            parse_shape(bad)
    for lo, mid, hi, message in [((0, 16, 16), (1, 16, 16), (1, 16, 16), "batch must be >= 1"),
                                 ((1, 8, 16), (1, 16, 16), (1, 16, 16), "at least 16"),
                                 ((1, 16, 20), (1, 16, 24), (1, 16, 24), "multiples of 8"),
                                 ((1, 16, 16), (8, 64, 64), (4, 64, 64), "min <= opt <= max")]:
        with pytest.raises(ValueError, match=message):
            ShapeProfile(lo, mid, hi)
    assert SMALL.reason(128, 16) is None and SMALL.reason(64, 64) is None
    assert "outside the engine's profile" in SMALL.reason(136, 64)
    assert SMALL.chunks(9) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert ShapeProfile.from_dict(json.loads(json.dumps(SMALL.as_dict()))) == SMALL


def test_dynamic_dimensions_follow_the_profile():
    dims = SMALL.dynamic_dims()
    assert sorted(dims) == [0, 2, 3]
    assert tuple(SMALL.example_input().shape) == (2, 1, 64, 64)
    fixed = ShapeProfile((1, 512, 512), (1, 512, 512), (1, 512, 512))
    assert fixed.dynamic_dims() == {} and tuple(fixed.example_input().shape) == (1, 1, 512, 512)


def test_tensorrt_profile_shapes_are_nchw():
    assert profile_shapes(SMALL) == {"image": ((1, 1, 16, 16), (2, 1, 64, 64), (4, 1, 128, 128))}


def test_tensorrt_container_round_trips_and_refuses_damage(tmp_path):
    tiny, _ = golden("tiny")
    meta = describe(tiny, "tensorrt", dict(format="tensorrt", precision="fp16", profile=SMALL.as_dict()))
    plan = bytes(range(256)) * 40
    path = tmp_path / "amir.engine"
    write_container(path, meta, plan)
    got, body = read_container(path)
    assert body == plan and {k: got[k] for k in meta} == meta
    assert read_metadata(path)["medir_fast.format"] == "medir-fast tensorrt 2"
    data = path.read_bytes()
    for name, content, message in [("cut.engine", data[:-10], "does not match the header's sha256"),
                                   ("flip.engine", data[:-5] + bytes([data[-5] ^ 1]) + data[-4:], "sha256"),
                                   ("head.engine", data[:30], "header is cut"),
                                   ("plain.engine", plan, "no medir-fast header")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EngineError, match=message):
            read_container(tmp_path / name)


def test_info_reads_a_tensorrt_engine_without_tensorrt(tmp_path, capsys):
    tiny, _ = golden("tiny")
    path = tmp_path / "amir.engine"
    write_container(path, describe(tiny, "tensorrt", dict(format="tensorrt", precision="fp32", profile=SMALL.as_dict())),
                    b"plan")
    assert main(["info", str(path)]) == 0
    assert '"precision": "fp32"' in capsys.readouterr().out


def test_tensorrt_says_in_one_line_why_it_cannot_run_here(tmp_path, capsys, ct_volume):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("TensorRT and a CUDA device are here: the path can run (this test is for machines without)")
    except ImportError:
        pass
    reason = unavailable_reason("tensorrt", torch.device("cpu"), torch.float32)
    assert reason is not None and ("not installed" in reason or "NVIDIA GPUs only" in reason)
    assert "bfloat16" in unavailable_reason("tensorrt", torch.device("cpu"), torch.bfloat16)
    base = ["infer", str(ct_volume), "--task", "ct_denoise", "--weights", str(DATA / "tiny_state_dict.pth"),
            "-o", str(tmp_path / "out.nii.gz")]
    engine = tmp_path / "x.engine"
    write_container(engine, {"medir_fast.format": "medir-fast tensorrt 2",
                             "medir_fast.export": json.dumps({"precision": "fp32", "profile": SMALL.as_dict()})}, b"plan")
    for extra in (["--backend", "tensorrt"], ["--engine", str(engine)]):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err
        assert not (tmp_path / "out.nii.gz").exists()


def test_every_backend_is_listed_with_its_reason(capsys):
    assert {"onnxruntime", "aoti", "tensorrt"} <= set(BACKENDS)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt on cpu: unavailable: " in out and "aoti on cpu: " in out


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    tiny, _ = golden("tiny")
    path = tmp_path_factory.mktemp("fp16") / "tiny16.onnx"
    return export(tiny, path, "onnx", precision="fp16", profile=SMALL)


def test_fp16_onnx_engine_keeps_float32_islands_and_is_as_close_as_pytorch_fp16(tiny_fp16):
    """Error against the float32 model, relative L2 over fresh random slices: the fp16 engine in
    ONNX Runtime at most 2x PyTorch's own fp16 (the same casts, eager) plus 1e-3. The routing's
    top-2 choice may flip at near-ties in either, so max abs is not a fair measure here."""
    import onnx

    proto = onnx.load(str(tiny_fp16))
    types = {init.data_type for init in proto.graph.initializer if len(init.dims) > 1}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT in types  # backbone fp16, islands fp32
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert settings(read_metadata(tiny_fp16))["precision"] == "fp16"

    tiny, _ = golden("tiny")
    half = cast_backbone(tiny, torch.float16)
    engine = Restorer(tiny, "ct_denoise", engine=tiny_fp16, tile=0)
    assert engine.dtype == torch.float16  # precision auto: the engine's
    x = np.random.default_rng(7).uniform(0, 1, (3, 40, 56)).astype(np.float32)
    with torch.no_grad():
        want = tiny(torch.from_numpy(x)[:, None]).numpy()[:, 0]
        pytorch_fp16 = half(torch.from_numpy(x)[:, None]).float().numpy()[:, 0]
    got = engine.restore_normalized(x)

    def rel(a):
        return np.linalg.norm(a - want) / np.linalg.norm(want)

    assert rel(got) <= 2 * rel(pytorch_fp16) + 1e-3, (rel(got), rel(pytorch_fp16))
    with pytest.raises(EngineError, match="built for fp16, not fp32"):
        Restorer(tiny, "ct_denoise", engine=tiny_fp16, precision="fp32")


def test_a_slice_outside_the_engines_profile_is_one_line_and_writes_nothing(tiny_fp16, tmp_path, capsys):
    from .conftest import write_nifti

    tiny, _ = golden("tiny")
    engine = Restorer(tiny, "ct_denoise", engine=tiny_fp16, tile=0)
    with pytest.raises(EngineError, match="outside the engine's profile"):
        engine.restore_normalized(np.zeros((1, 136, 64), np.float32) + 0.5)
    volume = write_nifti(tmp_path / "wide.nii.gz", np.full((2, 136, 24), 40.0, np.float32))
    assert main(["infer", str(volume), "--task", "ct_denoise", "--weights", str(DATA / "tiny_state_dict.pth"),
                 "--engine", str(tiny_fp16), "--tile", "0", "--axis", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the engine's profile" in err[0] and "--tile" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.nii.gz"]
    # in tiles that fit, the same engine runs it
    assert main(["infer", str(volume), "--task", "ct_denoise", "--weights", str(DATA / "tiny_state_dict.pth"),
                 "--engine", str(tiny_fp16), "--tile", "64", "--axis", "0", "-o", str(tmp_path / "out.nii.gz")]) == 0
    assert np.isfinite(nib.load(tmp_path / "out.nii.gz").get_fdata()).all()


def test_default_profiles_are_what_the_help_says():
    assert FORMATS["onnx"].profile == DEFAULT_PROFILE
    assert FORMATS["tensorrt"].profile.max == (16, 1024, 1024)
    assert FORMATS["aoti"].precisions == ("fp32", "fp16", "bf16") and "bf16" not in FORMATS["onnx"].precisions


class _Recorder:
    """An EngineBackend's batching without an engine: records the batches it is given."""

    def __init__(self, profile):
        from medir_fast.backends import EngineBackend

        self.backend = EngineBackend.__new__(EngineBackend)
        self.backend.profile = profile
        self.seen = []
        self.backend.run_chunk = lambda batch: self.seen.append(len(batch)) or batch * 2


def test_batches_run_in_chunks_within_the_profile_padded_up_to_its_smallest():
    recorder = _Recorder(ShapeProfile((3, 16, 16), (4, 64, 64), (4, 64, 64)))
    x = torch.rand(10, 1, 32, 24)
    torch.testing.assert_close(recorder.backend.run(x), x * 2)
    assert recorder.seen == [4, 4, 3]  # 4 + 4 + 2 padded to the smallest batch, 3
    recorder.seen.clear()
    torch.testing.assert_close(recorder.backend.run(x[:1]), x[:1] * 2)
    assert recorder.seen == [3]
    with pytest.raises(EngineError, match="outside the engine's profile"):
        recorder.backend.run(torch.rand(1, 1, 72, 24))


def test_an_engine_from_an_older_medir_fast_is_refused_in_one_line(tmp_path, capsys):
    tiny, _ = golden("tiny")
    old = tmp_path / "old.engine"
    meta = describe(tiny, "tensorrt", dict(precision="fp32", profile=SMALL.as_dict()))
    write_container(old, {**meta, "medir_fast.format": "medir-fast tensorrt 1"}, b"plan")
    from medir_fast.export.metadata import fits

    assert "another medir-fast version" in fits(read_metadata(old), tiny, "tensorrt")
    older = tmp_path / "older.engine"  # settings of the first release: no shape profile
    write_container(older, {**meta, "medir_fast.export": json.dumps({"precision": "fp32", "max_side": 512})}, b"plan")
    with pytest.raises(EngineError, match="older medir-fast"):
        read_metadata(older)
