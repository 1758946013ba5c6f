"""`medir-fast eval`: input, model and tuned baselines per task, as a table and JSON."""

import json
from pathlib import Path

import numpy as np
import pytest

from medir_fast.lab import evaluate
from medir_fast.cli import main
from medir_fast.tasks import get_task

pytest.importorskip("bm3d")
TINY_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "tiny_state_dict.pth"


def _run(args_list, capsys):
    code = main(["eval", *args_list])
    return code, capsys.readouterr()


def test_eval_reports_every_method(layout, tmp_path, capsys):
    cache = tmp_path / "baselines.json"
    out = tmp_path / "report.json"
    code, io = _run([str(layout), "--weights", str(TINY_WEIGHTS), "--json", str(out), "--baseline-cache", str(cache)], capsys)
    assert code == 0
    report = json.loads(out.read_text())
    methods = {mod: set(m) for mod, m in report["modalities"].items()}
    assert methods == {"CT": {"input", "model", "bm3d"}, "MRI": {"input", "model"}, "PET": {"input", "model", "bm3d", "gaussian"}}
    for mod, m in report["modalities"].items():
        for name in m:
            if name not in ("input", "model"):  # tuned per slice on white noise: must beat the input
                assert m[name]["psnr"] > m["input"]["psnr"] + 1, (mod, name)
    assert "vs bm3d" in io.out and "PET (all files)" in io.out
    params = report["files"]["PET/vol"]["methods"]["gaussian"]["params"]
    assert len(params) == 3 and all(p in evaluate.GAUSSIAN_SIGMAS for p in params)
    assert len(json.loads(cache.read_text())) == 3  # bm3d CT, bm3d PET, gaussian PET

    # the second run is answered from the cache: no new entries
    _run([str(layout), "--no-model", "--baseline-cache", str(cache), "--modalities", "PET"], capsys)
    assert len(json.loads(cache.read_text())) == 3


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    code, io = _run([str(tmp_path / "nowhere"), "--no-model"], capsys)
    assert code == 2 and "data folder not found" in io.err and io.err.count("\n") == 1


def test_best_baseline_counts_the_input():
    methods = {"input": {"psnr": 30.0}, "model": {"psnr": 40.0}, "bm3d": {"psnr": 29.0}}
    assert evaluate.best_baseline(methods) == "input"


def test_eval_tile_reaches_the_network(layout, tmp_path, capsys):
    scores = {}
    for tile in (None, 16):
        out = tmp_path / f"report-{tile}.json"
        args = [str(layout), "--weights", str(TINY_WEIGHTS), "--no-baselines", "--modalities", "CT", "--json", str(out)]
        code, _ = _run(args + (["--tile", str(tile)] if tile else []), capsys)
        report = json.loads(out.read_text())
        assert code == 0 and report["tile"] == {"CT": tile}
        scores[tile] = report["modalities"]["CT"]["model"]["psnr"]
    assert scores[None] != scores[16]  # 40 x 40 slices in 16 x 16 tiles: the global prompt and attention change


def test_eval_tile_per_modality(layout, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = [str(layout), "--weights", str(TINY_WEIGHTS), "--no-baselines", "--modalities", "CT,PET", "--json", str(out)]
    code, _ = _run(args + ["--tile", "CT=16,PET=0"], capsys)
    assert code == 0 and json.loads(out.read_text())["tile"] == {"CT": 16, "PET": None}


@pytest.mark.parametrize("tile, message", [("12", "tile must be a multiple of 8"), ("CT=16", "--tile must be a size or one per"),
                                           ("big", "--tile must be a size or one per")])
def test_eval_bad_tile_is_one_line(layout, capsys, tile, message):
    code, io = _run([str(layout), "--weights", str(TINY_WEIGHTS), "--no-baselines", "--tile", tile], capsys)
    assert code == 2 and message in io.err and io.err.count("\n") == 1


def test_texture_change_counts_only_what_the_model_alters_inside_the_window():
    rng = np.random.default_rng(0)
    clean = rng.normal(40.0, 5.0, (2, 32, 32)).astype(np.float32)  # soft tissue
    clean[:, :8] = -1000.0  # air, outside the CT window
    task = get_task("ct_denoise")

    class Shift:  # changes air arbitrarily and tissue by 3 HU
        def __init__(self, hu):
            self.task, self.hu = task, hu

        def restore_slices(self, x):
            return np.where(x < -500, x + 700.0, x + self.hu)

    assert evaluate.texture_change(Shift(0.0), clean) == 0.0
    assert evaluate.texture_change(Shift(3.0), clean) == pytest.approx(3.0, rel=1e-5)
