"""Augmented training copies: protocol v1 applied to re-posed anatomy, test slices untouched."""

import nibabel as nib
import numpy as np
import pytest

from medir_fast.lab import paired, simulate


def blobs(n: int, h: int, w: int, lo: float, span: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    return np.stack([lo + span * np.exp(-((xx - rng.uniform(0.3, 0.7) * w) ** 2 + (yy - rng.uniform(0.3, 0.7) * h) ** 2)
                                        / (0.05 * h * w)) for _ in range(n)]).astype(np.float32)


@pytest.mark.parametrize("modality", ["MRI", "PET"])
def test_copies_are_reproducible_and_degraded_by_protocol_v1(modality):
    hq = blobs(3, 30, 36, 0.0, 2000.0 if modality == "MRI" else 8.0)
    first, zoom = paired.augmented_pairs(modality, hq, 1.0, np.random.default_rng(5))
    again, _ = paired.augmented_pairs(modality, hq, 1.0, np.random.default_rng(5))
    assert 0.8 <= zoom <= 1.4
    assert sorted(first) == (["_x2", "_x4"] if modality == "MRI" else [""])
    for suffix, (lq, target) in first.items():
        assert target.shape == lq.shape == (3, round(30 * zoom), round(36 * zoom))
        assert target.dtype == lq.dtype == np.float32 and target.min() >= 0
        np.testing.assert_array_equal(lq, again[suffix][0])
        if modality == "MRI":
            np.testing.assert_allclose(lq, simulate.simulate_mri(target, int(suffix[2:])), rtol=1e-6, atol=1e-3)
        else:  # Poisson at 12x lower dose, rescaled: noisy but unbiased
            assert np.abs(lq - target).mean() > 0.05 * target.mean()
            assert abs(lq.mean() / target.mean() - 1) < 0.05


def test_ct_copy_keeps_hounsfield_units():
    yy, xx = np.mgrid[:40, :40] - 19.5
    water_disk = np.where(np.hypot(yy, xx) < 14, 0.0, -1000.0)[None].astype(np.float32)  # any zoom or angle keeps it centred
    pairs, zoom = paired.augmented_pairs("CT", water_disk, 0.9, np.random.default_rng(1))
    lq, target = pairs[""]
    c, r = target.shape[-1] // 2, round(5 * zoom)
    assert abs(float(target[0, c - r:c + r, c - r:c + r].mean())) < 30  # water stays at 0 HU
    assert 1 < float((lq - target)[0, c - r:c + r, c - r:c + r].std()) < 200  # low-dose noise is there


def test_ct_copies_vary_dose_and_head_size_per_slice():
    """The network must see quieter CT than protocol v1's (small, top-of-head slices): noise differs per slice."""
    yy, xx = np.mgrid[:48, :48] - 23.5
    disks = np.repeat(np.where(np.hypot(yy, xx) < 18, 40.0, -1000.0)[None], 6, axis=0).astype(np.float32)
    pairs, _ = paired.augmented_pairs("CT", disks, 0.9, np.random.default_rng(3))
    lq, target = pairs[""]
    c = target.shape[-1] // 2
    noise = [float((lq - target)[i, c - 6:c + 6, c - 6:c + 6].std()) for i in range(len(lq))]
    assert max(noise) > 1.6 * min(noise), noise  # one fixed dose would give equal noise up to ~10%


def test_ct_dose_range_sets_the_noise_of_the_copies():
    """`ct_dose` (train --ct-dose) reaches the noise of other patients' finer grids: 0.05x I0 is ~4.5x the noise std of 1x."""
    yy, xx = np.mgrid[:48, :48] - 23.5
    disks = np.repeat(np.where(np.hypot(yy, xx) < 18, 40.0, -1000.0)[None], 4, axis=0).astype(np.float32)
    noise = {}
    for dose in (0.05, 1.0):
        pairs, _ = paired.augmented_pairs("CT", disks, 0.9, np.random.default_rng(3), ct_dose=(dose, dose))
        lq, target = pairs[""]
        c = target.shape[-1] // 2
        noise[dose] = np.mean([float((lq - target)[i, c - 6:c + 6, c - 6:c + 6].std()) for i in range(len(lq))])
    assert 3 < noise[0.05] / noise[1.0] < 6, noise  # std ~ dose^-1/2; head size varies per slice alike in both


def test_pet_copies_reach_low_count_levels():
    """Uptake gains go down to 0.25, as faint as the top slices of a brain."""
    hq = blobs(12, 30, 30, 0.0, 8.0)
    pairs, zoom = paired.augmented_pairs("PET", hq, 1.0, np.random.default_rng(4))
    gains = pairs[""][1].sum(axis=(1, 2)) / (hq.sum(axis=(1, 2)) * zoom**2)
    assert gains.min() < 0.45 and gains.max() > 0.9, gains


def test_build_writes_only_training_copies(tmp_path, monkeypatch):
    sources = {"ct_cranium": blobs(4, 24, 24, -1000.0, 1050.0), "mri_colin27": blobs(4, 24, 28, 0.0, 1500.0),
               "pet_fdg_template": blobs(4, 20, 22, 0.0, 6.0)}
    paths = {}
    for name, vol in sources.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(vol, (1, 2, 0)), np.diag([0.9, 0.9, 2.0, 1.0])), paths[name])
    monkeypatch.setattr(paired, "fetch", lambda cache: paths)
    monkeypatch.setattr(paired, "SPLITS", {name: {"train": (0, 2), "test": (3, 4)} for name in sources})
    root = paired.build_augmented(tmp_path / "pairs", copies={"CT": 1, "MRI": 1, "PET": 2})
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*.nii.gz"))
    assert not any("/test/" in p for p in written)
    assert len(written) == 2 * (1 + 2 + 2)  # LQ and HQ of: CT copy, MRI copy at x2 and x4, two PET copies
    pairs = paired.read_pairs(root, "train")
    assert {p.modality for p in pairs} == {"CT", "MRI", "PET"} and all(len(p.lq) == 2 for p in pairs)
