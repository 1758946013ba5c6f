"""NIfTI in and out through `restore_file`: geometry, dtypes, axes, frames, NaNs, previews."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medir_fast import Restorer, restore_file
from medir_fast.io import VolumeError, read_volume, resampled_affine
from medir_fast.outputs import OutputError
from medir_fast.restorer import InputError

from .conftest import write_nifti


def _geometry(img):
    h = img.header
    return (img.affine.round(6).tolist(), int(h["qform_code"]), int(h["sform_code"]), h.get_xyzt_units(),
            tuple(round(z, 6) for z in h.get_zooms()))


def test_output_keeps_geometry_and_values_match_restorer(tmp_path, ct_volume, tiny_model):
    out = restore_file(ct_volume, tmp_path / "out.nii.gz", "ct_denoise", model=tiny_model, batch_size=2)
    src, dst = nib.load(ct_volume), nib.load(out)
    assert dst.shape == src.shape and dst.get_data_dtype() == np.float32
    assert _geometry(dst) == _geometry(src)
    expected = Restorer(tiny_model, "ct_denoise").restore_volume(src.get_fdata(dtype=np.float32), axis=2)
    np.testing.assert_allclose(dst.get_fdata(dtype=np.float32), expected, rtol=1e-5, atol=1e-2)


def test_out_dtype_input_honours_slope_and_intercept(tmp_path, tiny_model):
    raw = np.random.default_rng(0).integers(0, 3000, size=(20, 24, 3)).astype(np.int16)
    src = write_nifti(tmp_path / "scaled.nii", raw, dtype=np.int16, slope=2.0, inter=-1024.0)
    out = restore_file(src, tmp_path / "o.nii", "ct_denoise", model=tiny_model, out_dtype="input")
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16
    assert (img.dataobj.slope, img.dataobj.inter) == (2.0, -1024.0)
    as_float = restore_file(src, tmp_path / "f.nii", "ct_denoise", model=tiny_model)
    expected = nib.load(as_float).get_fdata()
    expected_raw = np.clip(np.round((expected + 1024.0) / 2.0), -32768, 32767)
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), expected_raw)


def test_slice_axis_follows_superior_inferior_direction(tmp_path):
    # voxel axis 0 runs along z (superior-inferior) in this affine
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "sag.nii.gz", np.zeros((4, 20, 30), np.float32) + 1, affine=affine)
    assert read_volume(path).slice_axis() == 0


def test_mri_sr_scale_refines_grid_consistently(tmp_path, tiny_model):
    lr = np.random.default_rng(1).uniform(0, 3000, size=(12, 10, 3)).astype(np.float32)
    src = write_nifti(tmp_path / "lr.nii.gz", lr, zooms=(2.0, 2.0, 3.0))
    out = nib.load(restore_file(src, tmp_path / "sr.nii.gz", "mri_sr", model=tiny_model, scale=2))
    assert out.shape == (24, 20, 3)
    assert out.header.get_zooms()[:3] == (1.0, 1.0, 3.0)
    # the first new voxel centre sits a quarter of an old voxel before the old first centre
    old = nib.load(src).affine
    np.testing.assert_allclose(out.affine[:3, 3], old[:3, 3] - np.array([0.5, 0.5, 0.0]))
    np.testing.assert_allclose(out.affine, resampled_affine(old, (0, 1), 2))
    np.testing.assert_allclose(out.header.get_qform(), out.affine)
    # field of view unchanged: the far corners of the two grids coincide
    corner = lambda a, shape: a @ np.array([shape[0] - 0.5, shape[1] - 0.5, 0, 1.0])
    np.testing.assert_allclose(corner(out.affine, out.shape), corner(old, lr.shape))


def test_mri_sr_without_scale_goes_straight_in(tmp_path, tiny_model):
    src = write_nifti(tmp_path / "on_grid.nii.gz", np.random.default_rng(2).uniform(0, 3000, (16, 16, 2)).astype(np.float32))
    assert nib.load(restore_file(src, tmp_path / "o.nii.gz", "mri_sr", model=tiny_model)).shape == (16, 16, 2)


def test_two_d_image_is_one_slice(tmp_path, tiny_model):
    img2d = np.random.default_rng(3).uniform(0, 20, (30, 22)).astype(np.float32)
    src = write_nifti(tmp_path / "pet2d.nii", img2d)
    out = nib.load(restore_file(src, tmp_path / "o.nii", "pet_synthesis", model=tiny_model))
    assert out.shape == (30, 22)
    np.testing.assert_allclose(out.get_fdata(), Restorer(tiny_model, "pet_synthesis").restore_slices(img2d), atol=1e-4)


def test_four_d_needs_a_frame(tmp_path, tiny_model):
    data = np.random.default_rng(4).uniform(0, 20, (16, 16, 2, 3)).astype(np.float32)
    src = write_nifti(tmp_path / "dyn.nii.gz", data)
    with pytest.raises(VolumeError, match="--frame"):
        restore_file(src, tmp_path / "o.nii.gz", "pet_synthesis", model=tiny_model)
    out = nib.load(restore_file(src, tmp_path / "o.nii.gz", "pet_synthesis", model=tiny_model, frame=1))
    assert out.shape == (16, 16, 2)
    expected = Restorer(tiny_model, "pet_synthesis").restore_volume(data[..., 1], axis=2)
    np.testing.assert_allclose(out.get_fdata(), expected, atol=1e-4)


def test_nan_voxels_refused_or_zeroed(tmp_path, tiny_model):
    data = np.random.default_rng(5).uniform(0, 20, (16, 16, 2)).astype(np.float32)
    data[3, 4, 1] = np.nan
    data[5, 5, 0] = np.inf
    src = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match="2 NaN/Inf voxels"):
        restore_file(src, tmp_path / "o.nii.gz", "pet_synthesis", model=tiny_model)
    assert not (tmp_path / "o.nii.gz").exists()
    out = nib.load(restore_file(src, tmp_path / "o.nii.gz", "pet_synthesis", model=tiny_model, nan_policy="zero"))
    assert np.isfinite(out.get_fdata()).all()


def test_range_override_warns_when_much_is_outside(tmp_path, tiny_model, caplog):
    data = np.random.default_rng(6).uniform(0, 100, (16, 16, 2)).astype(np.float32)
    src = write_nifti(tmp_path / "pet.nii.gz", data)
    restore_file(src, tmp_path / "o.nii.gz", "pet_synthesis", model=tiny_model, intensity_range=(0, 50))
    assert "outside the range" in caplog.text


def test_existing_output_needs_overwrite_and_input_is_never_overwritten(tmp_path, ct_volume, tiny_model):
    before = ct_volume.read_bytes()
    with pytest.raises(OutputError, match="is the input"):
        restore_file(ct_volume, ct_volume, "ct_denoise", model=tiny_model, overwrite=True)
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        restore_file(ct_volume, out, "ct_denoise", model=tiny_model)
    assert out.read_bytes() == b"keep me"
    restore_file(ct_volume, out, "ct_denoise", model=tiny_model, overwrite=True)
    assert nib.load(out).shape == (37, 61, 5)
    assert ct_volume.read_bytes() == before


def test_failed_write_leaves_no_partial_file(tmp_path, ct_volume, tiny_model, monkeypatch):
    import medir_fast.io.nifti as io

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(io, "array_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_a_file_that_does_not_read_back_is_never_committed(tmp_path, ct_volume, tiny_model, monkeypatch):
    """The read-back check catches a writer that gets the byte order wrong (as it once did)."""
    import medir_fast.io.nifti as io

    real = io.array_to_file

    def swapped(data, fileobj, out_dtype, *args, **kwargs):
        return real(data.byteswap(), fileobj, out_dtype, *args, **kwargs)  # the bytes of the other order
    monkeypatch.setattr(io, "array_to_file", swapped)
    with pytest.raises(RuntimeError, match="does not read back as written"):
        restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_truncated_gzip_is_reported(tmp_path, ct_volume):
    data = ct_volume.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated|cannot read"):
        volume = read_volume(bad)
        list(volume.slabs(2, 8))


def test_volume_is_read_in_slabs_not_whole(tmp_path, ct_volume, tiny_model, monkeypatch):
    """Peak memory is bounded by the batch: the restorer only ever sees batch-sized slabs."""
    seen = []
    original = Restorer.restore_slices

    def spy(self, slices, scale=None):
        seen.append(len(slices))
        return original(self, slices, scale)
    monkeypatch.setattr(Restorer, "restore_slices", spy)
    restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model, batch_size=2)
    assert seen == [2, 2, 1]


def test_preview_png_shows_three_panels(tmp_path, ct_volume, tiny_model):
    png = tmp_path / "p.png"
    restore_file(ct_volume, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model, preview=png)
    img = np.asarray(Image.open(png))
    assert img.shape == (61, 3 * 37 + 8)
    assert img.std() > 0


def test_stream_gives_the_same_volume(tmp_path, ct_volume, tiny_model):
    plain = nib.load(restore_file(ct_volume, tmp_path / "a.nii.gz", "ct_denoise", model=tiny_model, batch_size=2))
    streamed = nib.load(restore_file(ct_volume, tmp_path / "b.nii.gz", "ct_denoise", model=tiny_model,
                                     batch_size=2, stream=True))
    np.testing.assert_allclose(streamed.get_fdata(), plain.get_fdata(), rtol=1e-5, atol=1e-2)
    assert _geometry(streamed) == _geometry(plain)
