"""Loading checkpoints: plain, wrapped, DataParallel-prefixed; mismatches named; config inferred."""

from __future__ import annotations

import hashlib
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from medir_fast import load_model
from medir_fast.model import AMIR, CheckpointError, build_model, deepen, infer_config, read_state_dict

from .conftest import DATA, golden


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "wrapped_prefix"])
def test_wrapped_checkpoints_load_and_match_golden(tmp_path, wrap):
    sd = torch.load(DATA / "tiny_state_dict.pth", weights_only=True)
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": torch.tensor(3)},
        "model": {"model": sd},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "wrapped_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = load_model(path)
    _, io = golden("tiny")
    with torch.no_grad():
        assert (model(io["inputs"][0]) - io["outputs"][0]).abs().max() <= 1e-5


def test_mismatching_checkpoint_names_first_problems():
    sd = torch.load(DATA / "tiny_state_dict.pth", weights_only=True)
    with pytest.raises(CheckpointError, match=r"wrong shape .*patch_embed\.proj\.weight"):
        build_model(sd, config=dict(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1))
    broken = dict(sd)
    del broken["output.weight"]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing \(first: output\.weight\).*unexpected \(first: extra\.weight\)"):
        build_model(broken, config=dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        read_state_dict(junk)
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "dict.pth")
    torch.save({"x.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an AMIR checkpoint"):
        load_model(tmp_path / "other.pth")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        read_state_dict(tmp_path / "evil.pth")


def test_config_inferred_for_non_default_options(tmp_path):
    model = AMIR(dim=12, num_blocks=[1, 2, 1, 1], num_refinement_blocks=2, heads=[1, 2, 2, 4],
                 ffn_expansion_factor=2.0, bias=True, LayerNorm_type="BiasFree")
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.config == model.config


def test_deepened_network_computes_what_it_grew_from():
    """Appended blocks start as the identity: same outputs (float64) on a fresh random slice."""
    sd = torch.load(DATA / "tiny_state_dict.pth", weights_only=True)
    config = infer_config(sd)
    deeper = dict(config, num_blocks=[b + 1 for b in config["num_blocks"]],
                  num_refinement_blocks=config["num_refinement_blocks"] + 1)
    grown = deepen(sd, deeper)
    assert infer_config(grown) == deeper
    assert any(v.abs().sum() > 0 for k, v in grown.items() if k not in sd)  # fresh, not all zero
    x = torch.rand(2, 1, 48, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = build_model(sd, config).double()(x)
        after = build_model(grown, deeper).double()(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)


def test_deepen_refuses_other_changes():
    sd = torch.load(DATA / "tiny_state_dict.pth", weights_only=True)
    config = infer_config(sd)
    with pytest.raises(CheckpointError, match="settings differ: dim"):
        deepen(sd, dict(config, dim=config["dim"] * 2))
    with pytest.raises(CheckpointError, match="cannot remove blocks"):
        deepen(sd, dict(config, num_refinement_blocks=0))


def _flip_one_byte_of_a_tensor(src: Path, dst: Path) -> str:
    """Copy `src` with one bit flipped inside the stored bytes of a tensor record; its name."""
    with zipfile.ZipFile(src) as archive:
        info = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64][3]
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x04
    dst.write_bytes(bytes(data))
    return info.filename


def test_flipped_byte_in_a_tensor_is_refused_before_loading(tmp_path, monkeypatch):
    bad = tmp_path / "flipped.pth"
    record = _flip_one_byte_of_a_tensor(DATA / "tiny_state_dict.pth", bad)
    assert torch.load(bad, weights_only=True)  # torch alone would load it, one weight silently wrong
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled a damaged checkpoint"))
    with pytest.raises(CheckpointError, match=f"record '{record}' fails its CRC-32 check"):
        load_model(bad)


def test_truncated_checkpoint_is_refused(tmp_path):
    data = (DATA / "tiny_state_dict.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) - 200])
    with pytest.raises(CheckpointError, match="cannot read weights|damaged archive"):
        read_state_dict(tmp_path / "cut.pth")


def test_sha256_file_beside_the_weights_is_verified(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes((DATA / "tiny_state_dict.pth").read_bytes())
    sidecar = tmp_path / "w.pth.sha256"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    sidecar.write_text(f"{digest}  w.pth\n")  # as sha256sum writes it
    assert len(read_state_dict(weights)) == len(torch.load(DATA / "tiny_state_dict.pth", weights_only=True))
    sidecar.write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="fail the checksum in w.pth.sha256"):
        read_state_dict(weights)
    sidecar.write_text("not a checksum\n")
    with pytest.raises(CheckpointError, match="does not hold a sha256 checksum"):
        read_state_dict(weights)
