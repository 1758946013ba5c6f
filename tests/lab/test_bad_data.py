"""Paired folders that cannot be used: one clear error naming the file."""

import numpy as np
import pytest

from medir_fast.lab.paired import DataError, read_pairs

from .conftest import save


def test_reads_the_layout(layout):
    pairs = read_pairs(layout, "train")
    assert sorted(p.modality for p in pairs) == ["CT", "MRI", "PET"]
    assert pairs[0].lq.shape == (3, 40, 40)


def test_empty_folders(layout):
    for f in (layout / "PET" / "train" / "LQ").iterdir():
        f.unlink()
    for f in (layout / "PET" / "train" / "HQ").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"no \.nii or \.nii\.gz files in .*PET/train/LQ"):
        read_pairs(layout, "train")


def test_missing_folder(layout, tmp_path):
    with pytest.raises(DataError, match="missing folder .*MRI/valid/LQ"):
        read_pairs(layout, "valid", ("MRI",))


def test_unpaired_name(layout):
    save(layout / "CT" / "train" / "LQ" / "extra.nii.gz", np.zeros((40, 40)))
    with pytest.raises(DataError, match=r"CT/train/LQ/extra\.nii\.gz has no partner named extra"):
        read_pairs(layout, "train")


def test_mismatched_shapes(layout):
    save(layout / "MRI" / "train" / "HQ" / "vol.nii.gz", np.zeros((40, 36, 3)))
    with pytest.raises(DataError, match=r"MRI/train/LQ/vol\.nii\.gz has 3 slices of \(40, 40\) but .*HQ/vol\.nii\.gz has 3 of \(40, 36\)"):
        read_pairs(layout, "train")


def test_nan(layout):
    bad = np.ones((40, 40, 3))
    bad[5, 5, 1] = np.nan
    save(layout / "PET" / "train" / "HQ" / "vol.nii.gz", bad)
    with pytest.raises(DataError, match=r"PET/train/HQ/vol\.nii\.gz contains NaN"):
        read_pairs(layout, "train")


def test_unreadable_file(layout):
    (layout / "CT" / "train" / "LQ" / "vol.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"cannot read .*CT/train/LQ/vol\.nii\.gz"):
        read_pairs(layout, "train")


def test_reads_an_invesalius_project(tmp_path):
    """The CT source format: a tar.gz with main.plist (shape, dtype, spacing) and raw matrix.dat."""
    import io
    import plistlib
    import tarfile

    from medir_fast.lab.sources import _read_inv3

    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 1024
    meta = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [2, 3, 4]}, "spacing": [0.5, 0.5, 1.5]}
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        for name, payload in (("proj/main.plist", plistlib.dumps(meta)), ("proj/matrix.dat", volume.tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data, spacing = _read_inv3(blob.getvalue())
    np.testing.assert_array_equal(data, volume.astype(np.float32))
    assert spacing == (0.5, 0.5, 1.5)
