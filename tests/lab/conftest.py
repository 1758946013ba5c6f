"""Tiny synthetic paired data in the official layout (made here: no third-party images)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])


def save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), path)
    return path


def make_layout(root: Path, slices: int = 3, size: int = 40, seed: int = 0) -> Path:
    """Smooth blobs in each modality's units; LQ = HQ + noise (train and test)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    scale = {"CT": (-1000.0, 1400.0), "MRI": (0.0, 2000.0), "PET": (0.0, 8.0)}
    for modality, (lo, span) in scale.items():
        for split in ("train", "test"):
            hq = np.stack([lo + span * np.exp(-((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2) / 0.05)
                           for _ in range(slices)], -1)
            lq = hq + 0.05 * span * rng.normal(size=hq.shape)
            save(root / modality / split / "LQ" / "vol.nii.gz", lq)
            save(root / modality / split / "HQ" / "vol.nii.gz", hq)
    return root


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path / "data")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP spin-waits crawl on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
