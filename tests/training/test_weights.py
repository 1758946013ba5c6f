"""Shipped weights: listed by the manifest, refused when missing, unknown or tampered with."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_fast import weights
from medir_fast.api import resolve_tile, restore_file
from medir_fast.model import AMIR, build_model

from .conftest import TINY


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A private copy of the weights folder with one tiny model in it."""
    folder = tmp_path / "weights"
    folder.mkdir()
    config = dict(AMIR(**TINY).config)
    torch.manual_seed(0)
    torch.save(AMIR(**config).state_dict(), folder / "tiny.pth")
    manifest = {"default": "tiny", "models": {"tiny": {"file": "tiny.pth", "sha256": weights.sha256(folder / "tiny.pth"),
                                                         "config": config}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "HERE", folder)
    monkeypatch.setattr(weights, "MANIFEST", folder / "manifest.json")
    return folder


def test_load_verifies_and_builds(shipped):
    assert weights.available() == ["tiny"]
    state_dict, config = weights.load()
    build_model(state_dict, config)
    assert weights.load("tiny")[1] == config


def test_tampered_file_is_refused(shipped):
    data = bytearray((shipped / "tiny.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (shipped / "tiny.pth").write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="fail their checksum") as info:
        weights.load()
    assert "\n" not in str(info.value)


def test_unknown_name_and_missing_file(shipped):
    with pytest.raises(weights.WeightsError, match="unknown shipped weights 'full'; available: tiny"):
        weights.load("full")
    (shipped / "tiny.pth").unlink()
    with pytest.raises(weights.WeightsError, match="missing their file"):
        weights.load()


def test_empty_manifest_means_none_shipped(shipped):
    (shipped / "manifest.json").write_text('{"default": null, "models": {}}')
    assert weights.available() == []
    with pytest.raises(weights.WeightsError, match="no default weights are shipped"):
        weights.load()
    assert issubclass(weights.WeightsError, ValueError)


def test_the_real_manifest_verifies():
    """Every model the package ships passes its checksum and fits its config."""
    for name in weights.available():
        state_dict, config = weights.load(name)
        build_model(state_dict, config, source=name)


def test_shipped_tile_is_the_default_and_zero_means_whole_slices(shipped, tmp_path, ct_volume):
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["models"]["tiny"]["tile"] = {"ct_denoise": 16}
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    assert weights.default_tile(None, "ct_denoise") == weights.default_tile("tiny", "ct_denoise") == 16
    assert weights.default_tile("tiny", "mri_sr") is None  # no tile for this task: whole slices
    assert weights.default_tile(str(tmp_path / "own.pth"), "ct_denoise") is None  # not shipped
    assert resolve_tile(None, None, "ct_denoise") == 16 and resolve_tile(24, None, "ct_denoise") == 24
    assert resolve_tile(0, None, "ct_denoise") is None

    outs = {}
    for tile in (None, 16, 0):
        out = restore_file(ct_volume, tmp_path / f"out-{tile}.nii.gz", "ct_denoise", tile=tile, backend="eager")
        outs[tile] = np.asarray(nib.load(out).dataobj)
    assert np.array_equal(outs[None], outs[16])  # the shipped tile is what runs by default
    assert not np.allclose(outs[None], outs[0])  # and differs from whole slices on these 37 x 61 slices
