"""Shipped weights: listed by the manifest, refused when missing, unknown or tampered with; one
resolver for their names; their tiles are what a Restorer runs when given none."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_fast import Restorer, load_model, weights
from medir_fast.api import restore_file
from medir_fast.model import AMIR, build_model

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])


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
    assert weights.tiles("tiny") == {"ct_denoise": 16}
    model = load_model()
    assert Restorer(model, "ct_denoise").tile == 16  # what infer runs by default, in Python too
    assert Restorer(model, "mri_sr").tile is None  # no tile for this task: whole slices
    assert Restorer(model, "ct_denoise", tile=24).tile == 24 and Restorer(model, "ct_denoise", tile=0).tile is None
    own = tmp_path / "own.pth"
    torch.save(model.state_dict(), own)
    assert Restorer(load_model(own), "ct_denoise").tile is None  # not shipped: whole slices

    outs = {}
    for tile in (None, 16, 0):
        out = restore_file(ct_volume, tmp_path / f"out-{tile}.nii.gz", "ct_denoise", tile=tile, backend="eager")
        outs[tile] = np.asarray(nib.load(out).dataobj)
    assert np.array_equal(outs[None], outs[16])  # the shipped tile is what runs by default
    assert not np.allclose(outs[None], outs[0])  # and differs from whole slices on these 37 x 61 slices
    python = Restorer(model, "ct_denoise", backend="eager").restore_volume(nib.load(ct_volume).get_fdata(dtype=np.float32), axis=2)
    np.testing.assert_array_equal(python, nib.load(tmp_path / "out-None.nii.gz").get_fdata(dtype=np.float32))


@pytest.mark.parametrize("name", [None, "default", "tiny"])
def test_one_resolver_for_shipped_names(shipped, tmp_path, name):
    """load_model, --weights and train --init all take None, "default" and a shipped name."""
    from medir_fast.lab.training import init_state_dict

    expected = weights.load("tiny")[0]
    for state in (load_model(name).state_dict(), init_state_dict(name or "default")):
        assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_manifest_is_parsed_once(shipped, monkeypatch):
    calls = []
    original = json.loads
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: calls.append(1) or original(text, *a, **k))
    for _ in range(3):
        weights.available(), weights.tiles("tiny"), weights.shipped_name(None)
    assert len(calls) <= 1


def test_per_modality_options_take_task_names_or_modalities():
    """The workbench's per-modality options (crops, shares, tiles) and the manifest's per-task
    tiles read one table: `ct_denoise=80` and `CT=80` are the same thing."""
    from medir_fast.tasks import per_modality

    error = ValueError("bad")
    assert per_modality("ct_denoise=80,MRI=128,pet=64", ("CT", "MRI", "PET"), error) == {"CT": 80, "MRI": 128, "PET": 64}
    with pytest.raises(ValueError, match="bad"):
        per_modality("CT=80", ("CT", "MRI"), error)
    with pytest.raises(ValueError, match="bad"):
        per_modality("XR=80", ("CT",), error)
