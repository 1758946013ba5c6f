"""Shipped weights: listed by the manifest, refused when missing, unknown or tampered with."""

import json

import pytest
import torch

from medir_fast import weights
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
