"""Shared fixtures: the golden AMIR cases, small models and synthetic NIfTI files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_fast.model import build_model

DATA = Path(__file__).parent / "data"
GOLDEN_CASES = sorted(json.loads((DATA / "manifest.json").read_text()))


def golden(case: str):
    """(eval AMIR with the golden weights, io dict with inputs/outputs/intermediates)."""
    model = build_model(torch.load(DATA / f"{case}_state_dict.pth", weights_only=True))
    io = torch.load(DATA / f"{case}_io.pt", weights_only=True)
    return model, io


@pytest.fixture(scope="session")
def tiny_model():
    return golden("tiny")[0]


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    return DATA / "tiny_state_dict.pth"


def write_nifti(path: Path, data: np.ndarray, zooms=(0.8, 0.8, 2.5), dtype=None, slope=None, inter=None,
                affine: np.ndarray | None = None) -> Path:
    """A NIfTI with full geometry (qform/sform codes, units) for round-trip checks."""
    if affine is None:
        affine = np.diag([*zooms[: data.ndim], *([1.0] * (3 - min(3, data.ndim))), 1.0])[:4, :4]
        affine[:3, 3] = [-10.0, 20.0, -30.0]
    img = nib.Nifti1Image(data, affine, dtype=dtype if dtype is not None else data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    img.to_filename(path)
    return path


@pytest.fixture
def ct_volume(tmp_path) -> Path:
    """A small CT-like int16 volume in HU, 37 x 61 x 5 (odd in-plane sizes), slices along axis 2."""
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 300, size=(37, 61, 5)).clip(-1024, 3000).astype(np.int16)
    return write_nifti(tmp_path / "ct.nii.gz", hu)
