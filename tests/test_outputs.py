"""Every output path checked before any work, outputs committed together, options validated
first, outputs checked before they are written, `--scale` geometry carried in world coordinates."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medir_fast.api as api
from medir_fast import Restorer, restore_file
from medir_fast.cli import main
from medir_fast.io import VolumeError, read_volume, resampled_affine, stored_values
from medir_fast.outputs import OutputError, Outputs
from medir_fast.restorer import InputError
from medir_fast.runtime import SliceFailed, Stream
from medir_fast.tasks import get_task

from .conftest import DATA, write_nifti
from .test_checkpoint import _flip_one_byte_of_a_tensor

TINY = DATA / "tiny_state_dict.pth"


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _symlink(t: Path, target: Path, name: str) -> Path:
    (t / name).symlink_to(target)
    return t / name


def _hardlink(t: Path, target: Path, name: str) -> Path:
    os.link(target, t / name)
    return t / name


def _existing(t: Path, name: str) -> Path:
    (t / name).write_bytes(b"keep me")
    return t / name


def _folder(t: Path, name: str) -> Path:
    (t / name).mkdir()
    return t / name


def _flipped_weights(t: Path) -> Path:
    weights = t / "weights" / "flipped.pth"
    weights.parent.mkdir()
    _flip_one_byte_of_a_tensor(TINY, weights)
    return weights


# case -> (extra arguments made from (folder, input), the one line's text)
BAD_ARGUMENTS = {
    "preview naming the input": (lambda t, i: ["--preview", i], "preview must end in .png"),
    "preview symlinked to the input": (lambda t, i: ["--preview", _symlink(t, i, "p.png"), "--overwrite"], "is the input"),
    "preview hard-linked to the input": (lambda t, i: ["--preview", _hardlink(t, i, "p.png"), "--overwrite"],
                                         "is the input"),
    "existing preview without --overwrite": (lambda t, i: ["--preview", _existing(t, "p.png")], "p.png exists"),
    "preview in a missing folder": (lambda t, i: ["--preview", t / "missing" / "p.png"], "preview folder does not exist"),
    "preview that is a folder": (lambda t, i: ["--preview", _folder(t, "p.png")], "is a folder"),
    "preview that is the output": (lambda t, i: ["-o", _existing(t, "o.nii.gz"), "--overwrite",
                                                 "--preview", _symlink(t, t / "o.nii.gz", "p.png")], "is also the output"),
    "output symlinked to the input": (lambda t, i: ["-o", _symlink(t, i, "o.nii.gz"), "--overwrite"], "is the input"),
    "output hard-linked to the input": (lambda t, i: ["-o", _hardlink(t, i, "o.nii.gz"), "--overwrite"], "is the input"),
    "output that is a folder": (lambda t, i: ["-o", _folder(t, "o.nii.gz")], "is a folder"),
    "output that is a folder without suffix": (lambda t, i: ["-o", _folder(t, "out")], "output must end in"),
    "output not NIfTI": (lambda t, i: ["-o", t / "o.png"], "output must end in"),
    "range with inf": (lambda t, i: ["--range", "-1024", "inf"], "must be finite"),
    "range with nan": (lambda t, i: ["--range", "0", "nan"], "must be finite"),
    "weights with a flipped byte": (lambda t, i: ["--weights", _flipped_weights(t)], "fails its CRC-32 check"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_paths_and_options_are_refused_before_any_work(tmp_path, capsys, monkeypatch, case):
    src = write_nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(40, 300, (20, 18, 3)).astype(np.int16))
    original = src.read_bytes()
    make, pattern = BAD_ARGUMENTS[case]
    extra = [str(a) for a in make(tmp_path, src)]
    before = files_in(tmp_path)
    contents = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(api, "_restore", lambda *a, **k: pytest.fail("computed before refusing"))
    weights = [] if "--weights" in extra else ["--weights", str(TINY)]
    code = main(["infer", str(src), "--task", "ct_denoise", *weights, *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    assert files_in(tmp_path) == before
    assert {p: p.read_bytes() for p in contents} == contents  # the input and every other file untouched
    assert src.read_bytes() == original


def test_preview_and_volume_are_written_together(tmp_path, ct_volume, tiny_model):
    out, png = tmp_path / "o.nii.gz", tmp_path / "p.png"
    restore_file(ct_volume, out, "ct_denoise", model=tiny_model, preview=png)
    assert out.exists() and png.exists()
    assert files_in(tmp_path) == ["ct.nii.gz", "o.nii.gz", "p.png"]


def test_failed_preview_leaves_no_volume(tmp_path, ct_volume, tiny_model, monkeypatch):
    import medir_fast.preview as preview

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(preview.Image, "fromarray", broken)
    with pytest.raises(OSError, match="disk full"):
        restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model, preview=tmp_path / "p.png")
    assert files_in(tmp_path) == ["ct.nii.gz"]


def test_commit_is_all_or_none_and_puts_replaced_files_back(tmp_path, monkeypatch):
    first, second = tmp_path / "a.nii", tmp_path / "b.png"
    first.write_bytes(b"old a")
    real = {"replace": os.replace, "link": os.link}

    def failing_on(name):
        def call(src, dst, **kwargs):
            if Path(dst) == second:
                raise OSError(28, "no space left on device")
            return real[name](src, dst, **kwargs)
        return call
    with Outputs([], overwrite=True) as outputs:
        for target in (outputs.add(first, "output", (".nii",)), outputs.add(second, "preview", (".png",))):
            outputs.temporary(target).write_bytes(b"new")
        monkeypatch.setattr(os, "replace", failing_on("replace"))
        monkeypatch.setattr(os, "link", failing_on("link"))
        with pytest.raises(OSError, match="no space"):
            outputs.commit()
    assert files_in(tmp_path) == ["a.nii"] and first.read_bytes() == b"old a"


def test_a_folder_is_committed_whole_and_put_back_when_a_later_target_fails(tmp_path, monkeypatch):
    """A series' folder replaces a full one only as a whole, and the old one comes back if the
    commit fails after it was placed (here: the preview after it)."""
    series, preview = tmp_path / "series", tmp_path / "p.png"
    series.mkdir()
    (series / "old.dcm").write_bytes(b"old")
    real = os.replace

    def failing(src, dst, **kwargs):
        if Path(dst) == preview:
            raise OSError(28, "no space left on device")
        return real(src, dst, **kwargs)
    with Outputs([], overwrite=True) as outputs:
        folder = outputs.add(series, "output", folder=True)
        (outputs.temporary(folder) / "IM00001.dcm").write_bytes(b"new")
        outputs.temporary(outputs.add(preview, "preview", (".png",))).write_bytes(b"png")
        monkeypatch.setattr(os, "replace", failing)
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "no space left on device")))
        with pytest.raises(OSError, match="no space"):
            outputs.commit()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"] and files_in(series) == ["old.dcm"]
    with Outputs([], overwrite=True) as outputs:
        folder = outputs.add(series, "output", folder=True)
        (outputs.temporary(folder) / "IM00001.dcm").write_bytes(b"new")
        outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"] and files_in(series) == ["IM00001.dcm"]


def test_an_interrupted_folder_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Outputs([]) as outputs:
            target = outputs.add(tmp_path / "series", "output", folder=True)
            (outputs.temporary(target) / "IM00001.dcm").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_leaving_by_an_error_removes_every_temporary(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Outputs([]) as outputs:
            target = outputs.add(tmp_path / "o.nii.gz", "output", (".nii.gz",))
            outputs.temporary(target).write_bytes(b"half")
            raise KeyboardInterrupt
    assert files_in(tmp_path) == []


def test_bad_out_dtype_is_refused_before_any_work(tmp_path, ct_volume, monkeypatch):
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(InputError, match="unknown output dtype 'int16'"):
        restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", out_dtype="int16")
    assert files_in(tmp_path) == ["ct.nii.gz"]


class NaNBackend:
    """A backend whose output has NaN voxels (as a diverging model or a broken kernel gives)."""

    name = "nan"

    def __init__(self, backend):
        self.inner = backend

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.inner.run(batch).clone()
        out[..., 3, 4] = float("nan")
        return out


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_non_finite_output_is_never_written(tmp_path, ct_volume, tiny_model, monkeypatch, stream):
    original = Restorer.__init__

    def with_nan_backend(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.backend = NaNBackend(self.backend)
    monkeypatch.setattr(Restorer, "__init__", with_nan_backend)
    with pytest.raises(ValueError, match="NaN or infinite; nothing was written") as exc:
        restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model, batch_size=2, stream=stream)
    if not stream:
        assert "5 of 11285 output voxels" in str(exc.value)  # one per slice
    assert files_in(tmp_path) == ["ct.nii.gz"]


def test_stream_never_hands_out_a_non_finite_slice():
    class Half:
        task = get_task("pet_synthesis")

        def restore_normalized(self, batch):
            out = batch.copy()
            out[1:, 0, 0] = np.inf
            return out
    with Stream(Half(), batch_size=2, shape=(16, 16)) as stream:
        for _ in range(2):
            stream.push(np.ones((16, 16), np.float32))
        stream.finish()
        assert stream.pop(30).shape == (16, 16)
        with pytest.raises(SliceFailed, match="1 restored voxels are NaN or infinite") as exc:
            stream.pop(30)
        assert exc.value.index == 1 and exc.value.nonfinite == 1


def test_values_that_do_not_fit_the_input_type_are_counted_not_clipped(tmp_path):
    src = write_nifti(tmp_path / "u8.nii", np.full((16, 16, 2), 100, np.uint8), dtype=np.uint8)
    volume = read_volume(src)
    data = np.full((16, 16, 2), 100.0, np.float32)
    data[0, 0, 0], data[1, 1, 1] = 300.0, -5.0
    with pytest.raises(VolumeError, match="2 of 512 output voxels do not fit the input's type uint8"):
        stored_values(data, volume, "input")
    stored, slope, inter = stored_values(np.full((16, 16, 2), 254.6, np.float32), volume, "input")
    assert stored.dtype == np.uint8 and (stored == 255).all() and (slope, inter) == (1.0, 0.0)


# --------------------------------------------------------------------------- --scale geometry


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


@pytest.mark.parametrize("qcode,scode", [(1, 2), (0, 2), (1, 0), (0, 0), (2, 4)])
def test_scale_carries_qform_and_sform_each_with_its_code(tmp_path, tiny_model, qcode, scode):
    """qform and sform differ (the sform is sheared and rotated); each is carried onto the finer
    grid: every new voxel centre sits where the old grid puts that continuous index, and the
    field of view's corners stay put, in world coordinates."""
    lr = np.random.default_rng(1).uniform(0, 3000, size=(12, 10, 3)).astype(np.float32)
    img = nib.Nifti1Image(lr, None)
    qform = np.diag([2.0, 2.0, 3.0, 1.0])
    qform[:3, 3] = [-11.0, 7.0, 30.0]
    c, s = np.cos(0.3), np.sin(0.3)
    sform = np.array([[2 * c, -2 * s, 0.4, 5.0], [2 * s, 2 * c, 0.0, -8.0], [0.0, 0.0, 3.1, 12.0], [0, 0, 0, 1]])
    img.header.set_qform(qform, code=qcode)
    img.header.set_sform(sform, code=scode)
    img.header.set_xyzt_units("mm", "sec")
    src = tmp_path / "lr.nii.gz"
    img.to_filename(src)
    before = nib.load(src).header
    out = nib.load(restore_file(src, tmp_path / "sr.nii.gz", "mri_sr", model=tiny_model, scale=2))
    after = out.header
    assert out.shape == (24, 20, 3)
    assert (int(after["qform_code"]), int(after["sform_code"])) == (qcode, scode)
    assert after.get_xyzt_units() == ("mm", "sec")
    new_ijk = np.random.default_rng(2).uniform(-0.5, 19.5, size=(50, 3)) * [1, 1, 0.1]
    old_ijk = new_ijk.copy()
    old_ijk[:, :2] = (new_ijk[:, :2] + 0.5) / 2 - 0.5
    for name in ("get_qform", "get_sform"):
        old, new = getattr(before, name)(), getattr(after, name)()
        np.testing.assert_allclose(_world(new, new_ijk), _world(old, old_ijk), atol=1e-4, err_msg=name)
        corners = np.array([[-0.5, -0.5, 0], [11.5, 9.5, 0], [-0.5, 9.5, 2]])
        np.testing.assert_allclose(_world(new, np.array([[-0.5, -0.5, 0], [23.5, 19.5, 0], [-0.5, 19.5, 2]])),
                                   _world(old, corners), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(after.get_zooms()[:3], (1.0, 1.0, 3.0), atol=1e-6)
    np.testing.assert_allclose(after.get_sform(), resampled_affine(before.get_sform(), (0, 1), 2), atol=1e-5)


def test_a_file_that_appears_during_the_run_is_not_replaced_without_overwrite(tmp_path):
    target = tmp_path / "o.nii.gz"
    with Outputs([]) as outputs:
        outputs.add(target, "output", (".nii.gz",))
        outputs.temporary(target).write_bytes(b"ours")
        target.write_bytes(b"another run's")  # appears while we compute
        with pytest.raises(OutputError, match="appeared during the run"):
            outputs.commit()
    assert files_in(tmp_path) == ["o.nii.gz"] and target.read_bytes() == b"another run's"


def test_a_rollback_that_cannot_put_a_file_back_keeps_and_names_it(tmp_path, monkeypatch):
    first, second = tmp_path / "a.nii", tmp_path / "b.png"
    first.write_bytes(b"old a")
    real_replace, real_link = os.replace, os.link

    def replace(src, dst):
        if Path(dst) == first and ".partial" in Path(src).name and Path(src).read_bytes() == b"old a":
            raise OSError(5, "input/output error")  # putting a.nii back fails
        return real_replace(src, dst)

    def link(src, dst, **kwargs):
        if Path(dst) == second:
            raise OSError(28, "no space left on device")
        return real_link(src, dst, **kwargs)
    with Outputs([], overwrite=True) as outputs:
        for target in (outputs.add(first, "output", (".nii",)), outputs.add(second, "preview", (".png",))):
            outputs.temporary(target).write_bytes(b"new")
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        with pytest.raises(OutputError, match=r"could not put back .*a\.nii is at .*\.partial\.nii"):
            outputs.commit()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"old a"  # the only copy of the old file survives


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32])
def test_values_at_the_top_of_a_64_bit_type_are_refused_not_wrapped(tmp_path, dtype):
    src = write_nifti(tmp_path / "big.nii", np.ones((16, 16, 2), dtype), dtype=dtype)
    volume = read_volume(src)
    top = float(np.iinfo(dtype).max) + 1  # 2**63, 2**64, 2**31: one past the largest value
    data = np.ones((16, 16, 2), np.float64)
    data[0, 0, 0] = top
    with pytest.raises(VolumeError, match=f"1 of 512 output voxels do not fit the input's type {np.dtype(dtype).name}"):
        stored_values(data, volume, "input")


def test_finite_values_beyond_float32_are_clipped_like_others_not_zeroed(tmp_path, tiny_model):
    data = np.full((16, 16, 2), 10.0)
    data[2, 3, 0] = 1e300
    data[4, 4, 1] = np.inf
    src = write_nifti(tmp_path / "f64.nii", data, dtype=np.float64)
    slab = read_volume(src).slab(2, 0, 2)
    assert slab[0, 2, 3] == np.finfo(np.float32).max and np.isinf(slab[1, 4, 4])
    with pytest.raises(InputError, match="1 NaN/Inf voxels"):
        restore_file(src, tmp_path / "o.nii", "pet_synthesis", model=tiny_model)
