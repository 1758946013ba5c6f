"""medir_fast.lab.ship_weights: a model fine-tuned through unshipped runs keeps its whole history."""

import json
from pathlib import Path

import pytest
import torch

from medir_fast import weights
from medir_fast.lab import paired, ship_weights


def _run(folder: Path, init, step: int, device: str) -> Path:
    folder.mkdir(parents=True)
    record = {"step": step, "seconds": 60.0, "config": {}, "steps": None, "time_budget": 1.0, "lr": 1e-4,
              "batch_size": 4, "crop": {"CT": 64, "MRI": 128, "PET": 64}, "modalities": ["CT", "MRI", "PET"],
              "init": init, "data": "protocol-v1 degraded afresh", "threads": 2, "device": device}
    (folder / "run.json").write_text(json.dumps(record))
    return folder / "weights.pth"


def test_history_follows_run_folders_back_to_the_shipped_model(tmp_path, monkeypatch):
    shipped_stages = [{"steps": 10}, {"init": "slim", "steps": 20}]
    monkeypatch.setattr(weights, "manifest", lambda: {"default": "slim", "models": {"slim": {"training": {"stages": shipped_stages}}}})
    gpu = _run(tmp_path / "gpu", "default", 951, "NVIDIA H100 80GB HBM3")
    cpu = _run(tmp_path / "cpu", str(gpu), 3000, "CPU (2 cores, 2 torch threads)")
    stages = ship_weights.history(str(cpu))
    assert [s["steps"] for s in stages] == [10, 20, 951, 3000]
    assert stages[2]["device"] == "NVIDIA H100 80GB HBM3" and stages[3]["init"] == str(gpu)
    assert stages[3]["schedule"] == "cosine over 1.0 min of training"


def test_unknown_init_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "manifest", lambda: {"default": "slim", "models": {}})
    with pytest.raises(SystemExit, match="cannot trace"):
        ship_weights.history(str(tmp_path / "nowhere" / "weights.pth"))


def test_a_run_whose_weights_were_shipped_stands_for_that_model(tmp_path, monkeypatch):
    """Stage 4 was shipped from a run folder recording init "default" (stage 3 then); a run from its
    weights must not repeat stage 4 or resolve "default" to stage 4 itself."""
    shipped_stages = [{"steps": 10}, {"init": "slim", "steps": 951}]
    monkeypatch.setattr(weights, "HERE", tmp_path)
    monkeypatch.setattr(weights, "manifest", lambda: {"default": "slim", "models": {
        "slim": {"file": "slim.pth", "training": {"stages": shipped_stages}}}})
    gpu = _run(tmp_path / "gpu", "default", 951, "NVIDIA H100 80GB HBM3")
    tensors = {"w": torch.randn(3, 3)}
    torch.save(tensors, gpu)
    torch.save({k: v.clone() for k, v in tensors.items()}, tmp_path / "slim.pth")  # same tensors, other bytes
    cpu = _run(tmp_path / "cpu", str(gpu), 5216, "CPU (2 cores, 2 torch threads)")
    assert [s["steps"] for s in ship_weights.history(str(cpu))] == [10, 951, 5216]
    torch.save({"w": torch.randn(3, 3)}, tmp_path / "slim.pth")  # other weights shipped: the run folder counts
    assert [s["steps"] for s in ship_weights.history(str(cpu))] == [10, 951, 951, 5216]


def test_runs_from_the_same_weights_ship_their_average(tmp_path, monkeypatch):
    shipped_stages = [{"steps": 10}]
    monkeypatch.setattr(weights, "manifest", lambda: {"default": "slim", "models": {"slim": {"training": {"stages": shipped_stages}}}})
    runs = [_run(tmp_path / name, "default", step, "NVIDIA H200") for name, step in (("g", 661), ("i", 1229))]
    tensors = [{"w": torch.randn(3, 3, dtype=torch.float64)} for _ in runs]
    records = [json.loads((r.parent / "run.json").read_text()) for r in runs]
    state_dict, entry = ship_weights.average(records, tensors, None)
    torch.testing.assert_close(state_dict["w"], (tensors[0]["w"] + tensors[1]["w"]) / 2)
    assert [s["steps"] for s in entry["average_of"]] == [661, 1229] and entry["init"] == "default"
    other = _run(tmp_path / "other", str(runs[0]), 100, "CPU")
    with pytest.raises(SystemExit, match="same init"):
        ship_weights.average([*records, json.loads((other.parent / "run.json").read_text())], [*tensors, tensors[0]], None)


def test_a_run_averaged_with_its_starting_weights(tmp_path, monkeypatch):
    """--with-init: a fine-tune pulled half-way back towards the weights it started from."""
    monkeypatch.setattr(weights, "manifest", lambda: {"default": "slim", "models": {"slim": {"training": {"stages": []}}}})
    start = {"w": torch.randn(3, 3)}
    torch.save(start, tmp_path / "start.pth")
    run = _run(tmp_path / "l", str(tmp_path / "start.pth"), 1221, "CPU")
    tuned = {"w": torch.randn(3, 3)}
    record = json.loads((run.parent / "run.json").read_text())
    state_dict, entry = ship_weights.average([record], [tuned], None, ship_weights.common_start([run.parent], [record]))
    torch.testing.assert_close(state_dict["w"], (start["w"] + tuned["w"]) / 2)
    assert [s["steps"] for s in entry["average_of"]] == [1221] and "started from" in entry["how"]
    with pytest.raises(SystemExit, match="needs runs that started from weights"):
        ship_weights.start_weights(run.parent, {**record, "init": None})


def test_a_grown_run_is_averaged_with_its_grown_start(tmp_path):
    """A run that added blocks to its init started from OUT/init.pth, not from the init itself;
    two runs grown with different fresh blocks have no common start."""
    runs = [_run(tmp_path / name, "default", 800, "CPU").parent for name in ("m", "n")]
    for seed, run in enumerate(runs):
        torch.save({"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))}, run / "init.pth")
    records = [json.loads((run / "run.json").read_text()) for run in runs]
    assert torch.equal(ship_weights.common_start(runs[:1], records[:1])["w"], torch.load(runs[0] / "init.pth")["w"])
    with pytest.raises(SystemExit, match="started from different weights"):
        ship_weights.common_start(runs, records)


def test_metrics_keep_the_margin_and_the_tiles_they_were_measured_at():
    report = {"split": "test", "tile": {"CT": 80, "PET": None},
              "modalities": {"CT": {"input": {"psnr": 40.0}, "model": {"psnr": 46.7234}, "bm3d": {"psnr": 47.05}},
                             "PET": {"input": {"psnr": 23.8}, "model": {"psnr": 33.18}, "gaussian": {"psnr": 32.36}}}}
    metrics = ship_weights.metrics(report)
    assert metrics["tile"] == {"CT": 80, "PET": None} and metrics["split"] == "test"
    assert metrics["per_modality"]["CT"]["best_baseline"] == "bm3d"
    assert metrics["per_modality"]["CT"]["model_minus_best_baseline_psnr_db"] == pytest.approx(-0.327)
    assert metrics["per_modality"]["PET"]["model_minus_best_baseline_psnr_db"] == pytest.approx(0.82)


def test_the_body_ct_patients_are_listed_only_when_a_stage_trained_on_them():
    what = {"package": "p", "version": "1", "license": "MIT", "what": "a scan"}
    sources = {name: what for name in [*paired.SOURCES, *paired.BODY_CT]}
    head_only = [{"data": "protocol-v1 degraded afresh (12 slices per source)"}]
    assert set(ship_weights.training_data(sources, head_only)) == set(paired.SOURCES)
    body = [*head_only, {"average_of": [{"data": f"protocol-v1 degraded afresh (..., {paired.BODY_CT_NOTE})"}]}]
    data = ship_weights.training_data(sources, body)
    assert set(data) == {*paired.SOURCES, *paired.BODY_CT_SPLIT["train"]}
    assert data["ct_cranium"]["slices"] == paired.SPLITS["ct_cranium"] and data["ct_cranium"]["license"] == "MIT"
    assert data[paired.BODY_CT_SPLIT["train"][0]]["slices"] == "all"
    del sources[paired.BODY_CT_SPLIT["train"][0]]
    with pytest.raises(SystemExit, match="not in the cache's sources.json"):
        ship_weights.training_data(sources, body)


def test_a_stage_names_its_loss_when_the_run_recorded_one():
    record = {"step": 5, "seconds": 60.0, "steps": None, "time_budget": 1.0, "lr": 1e-4, "batch_size": 4, "crop": 64,
              "modalities": ["CT"], "device": "CPU (2 cores, 2 torch threads)"}
    assert ship_weights.stage(dict(record, loss="log-l1"))["loss"] == "log-l1"
    assert "loss" not in ship_weights.stage(record)  # runs from before --loss trained on L1
