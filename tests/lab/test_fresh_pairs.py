"""`train --simulate`: pairs degraded afresh from the training slices of the source volumes."""

import json
import threading
import time
from concurrent.futures import CancelledError

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_fast.lab import paired, training

from .conftest import TINY

# Training slices hold ordinary values, test slices a marker no augmentation can reach from them.
SOURCES = {"ct_cranium": ((-1000.0, 1050.0), 3000.0), "mri_colin27": ((0.0, 1500.0), 9000.0),
           "pet_fdg_template": ((0.0, 6.0), 60.0)}


def _blobs(n, size, lo, span, rng):
    yy, xx = np.mgrid[:size, :size] / size
    return np.stack([lo + span * np.exp(-((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) / 0.05)
                     for _ in range(n)])


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Six-slice volumes: slices 0-3 train, 5 test (a marker value), scaled as protocol v1 wants."""
    assert set(SOURCES) == set(paired.SOURCES), "give every source a synthetic volume here"
    rng = np.random.default_rng(0)
    paths = {}
    for name, ((lo, span), marker) in SOURCES.items():
        volume = _blobs(6, 24, lo, span, rng)
        volume[5] = marker
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(volume, (1, 2, 0)).astype(np.float32), np.diag([0.9, 0.9, 2.0, 1.0])),
                 paths[name])
    monkeypatch.setattr(paired, "fetch", lambda cache=None, names=tuple(SOURCES): {n: paths[n] for n in names})
    monkeypatch.setattr(paired, "SPLITS", {name: {"train": (0, 4), "test": (5, 6)} for name in SOURCES})
    monkeypatch.setattr(paired, "clean_volume", _unscaled)  # the blobs are already in protocol units
    return paths


def _unscaled(name, path):
    img = nib.load(path)
    return np.ascontiguousarray(np.transpose(np.asarray(img.dataobj, np.float32), (2, 0, 1))), (0.9, 0.9, 2.0)


def test_pools_come_from_training_slices_with_new_noise_each_time(sources):
    first = paired.fresh_pairs(4, np.random.default_rng(1))
    again = paired.fresh_pairs(4, np.random.default_rng(1))
    other = paired.fresh_pairs(4, np.random.default_rng(2))
    names = sorted(p.name for p in first)
    mri = [f"mri_colin27_{kind}_x{s}" for kind in ("plain", "posed") for s in (2, 4)]
    assert names == sorted(["ct_cranium_plain", "ct_cranium_posed", "pet_fdg_template_plain", "pet_fdg_template_posed", *mri])
    for a, b, c in zip(first, again, other):
        assert len(a.hq) == 2 and a.lq.shape == a.hq.shape
        (_, span), marker = SOURCES[a.name.rsplit("_", 2 if a.modality == "MRI" else 1)[0]]
        assert a.hq.max() < (marker + span) / 2, f"{a.name}: a held-out slice was drawn"
        np.testing.assert_array_equal(a.lq, b.lq)  # reproducible from the seed
        if a.modality != "MRI":  # MRI's degradation has no noise; CT and PET draw it afresh
            assert not np.array_equal(a.lq, c.lq)


def test_pool_keeps_to_the_modalities_asked_for(sources):
    assert {p.modality for p in paired.fresh_pairs(2, np.random.default_rng(0), modalities=("PET",))} == {"PET"}


def test_closing_the_stream_stops_the_pool_being_simulated_at_its_next_source(sources, monkeypatch):
    """The end of a run must not wait minutes for a pool of body CT that nobody will train on."""
    inside, calls, degrade = threading.Event(), [], paired.degrade

    def slow_degrade(modality, *args, **kwargs):
        calls.append(modality)
        inside.set()
        time.sleep(0.3)
        return degrade(modality, *args, **kwargs)

    monkeypatch.setattr(paired, "degrade", slow_degrade)
    stream = training.FreshPairStream(2, np.random.default_rng(0), paired.MODALITIES, "cpu", paired.CT_DOSE_RANGE)
    assert inside.wait(10)
    stream.close()
    assert calls == ["CT"], "sources after the cancel were still simulated"
    with pytest.raises(CancelledError):
        stream.pending.result()


def test_training_on_fresh_pools(sources, tmp_path):
    config = dict(training.CONFIGS["slim"], **TINY)
    summary = training.train(None, tmp_path / "run", config, steps=5, batch_size=3, crop={"CT": 16, "MRI": 24, "PET": 16},
                             save_every=10, progress=False, simulate=True, pool_slices=2, refresh_every=2)
    assert summary["finished"] and all(np.isfinite(summary["losses"]))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["data"].startswith("protocol-v1 degraded afresh") and state["crop"] == {"CT": 16, "MRI": 24, "PET": 16}
    record = json.loads((tmp_path / "run" / "run.json").read_text())  # the same facts, readable without torch
    assert record == {k: state[k] for k in record} and record["step"] == 5 and record["device"].startswith("CPU")


def test_a_run_on_quieted_body_ct_says_so_and_its_manifest_lists_the_patients(sources, tmp_path, monkeypatch):
    asked = []

    def fresh_pairs(*args, **kwargs):  # the body patients are not in this cache: the head, MRI and PET only
        asked.append((kwargs.pop("body_ct"), kwargs.pop("quiet_body_ct")))
        return paired.fresh_pairs(*args, **kwargs)

    monkeypatch.setattr(training, "fresh_pairs", fresh_pairs)
    config = dict(training.CONFIGS["slim"], **TINY)
    training.train(None, tmp_path / "run", config, steps=1, batch_size=3, crop={"CT": 16, "MRI": 24, "PET": 16},
                   progress=False, simulate=True, pool_slices=2, body_ct=True, quiet_body_ct=0.5)
    assert asked and set(asked) == {(True, 0.5)}
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert paired.BODY_CT_NOTE in record["data"] and f"50% of its slices {paired.QUIET_BODY_CT_NOTE}" in record["data"]

    from medir_fast.lab import ship_weights

    what = {"package": "p", "version": "1", "license": "MIT", "what": "a scan"}
    data = ship_weights.training_data({n: what for n in [*paired.SOURCES, *paired.BODY_CT]}, [ship_weights.stage(record)])
    assert set(data) == {*paired.SOURCES, *paired.BODY_CT_SPLIT["train"]}
    assert paired.QUIET_BODY_CT_NOTE in data[paired.BODY_CT_SPLIT["train"][0]]["slices"]
