"""The `medir-fast` command: options, messages, and every bad input answered in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_fast import weights
from medir_fast.cli import main

from .conftest import DATA, write_nifti


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


def test_infer_writes_output_and_preview(tmp_path, capsys, ct_volume, tiny_weights):
    out = tmp_path / "o.nii.gz"
    code, stdout, err = run_cli(capsys, "infer", ct_volume, "-o", out, "--task", "ct_denoise",
                                "--weights", tiny_weights, "--device", "cpu", "--batch-size", "3",
                                "--preview", tmp_path / "p.png")
    assert code == 0, err
    assert stdout.strip() == str(out) and nib.load(out).shape == (37, 61, 5) and (tmp_path / "p.png").exists()


def test_default_output_name_beside_input(tmp_path, capsys, ct_volume, tiny_weights):
    code, stdout, err = run_cli(capsys, "infer", ct_volume, "--task", "ct_denoise", "--weights", tiny_weights)
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "ct_ct_denoise.nii.gz")


def test_self_ensemble_flag_reaches_the_network(tmp_path, capsys, ct_volume, tiny_weights):
    outs = {}
    for flag in ([], ["--self-ensemble"]):
        out = tmp_path / f"o{len(flag)}.nii.gz"
        code, _, err = run_cli(capsys, "infer", ct_volume, "-o", out, "--task", "ct_denoise", "--weights", tiny_weights, *flag)
        assert code == 0, err
        outs[bool(flag)] = np.asarray(nib.load(out).dataobj)
    assert outs[True].shape == outs[False].shape and not np.allclose(outs[True], outs[False])


def _text_file(t):
    (t / "x.txt").write_text("hello")
    return t / "x.txt"


def _garbage_nifti(t):
    (t / "g.nii").write_bytes(b"\0" * 400)
    return t / "g.nii"


def _truncated(t):
    path = write_nifti(t / "full.nii.gz", np.random.default_rng(0).random((64, 64, 8)).astype(np.float32))
    data = path.read_bytes()
    path.unlink()
    (t / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return t / "cut.nii.gz"


def _with_nan(t):
    a = np.ones((16, 16, 2), np.float32)
    a[0, 0, 0] = a[1, 1, 1] = np.nan
    a[2, 2, 0] = -np.inf
    return write_nifti(t / "n.nii.gz", a)


def _shaped(shape):
    return lambda t: write_nifti(t / "v.nii.gz", np.ones(shape, np.float32))


OK = _shaped((16, 16, 2))

# case -> (make input in the folder, extra arguments ({tmp} = the folder, {bad} = misfit weights), message)
BAD_INPUTS = {
    "missing file": (lambda t: t / "nope.nii.gz", [], "input not found"),
    "neither NIfTI nor DICOM": (_text_file, [], "neither DICOM nor NIfTI"),
    "garbage nifti": (_garbage_nifti, [], "cannot read"),
    "truncated gz": (_truncated, [], "cannot read"),
    "4-D without frame": (_shaped((16, 16, 2, 3)), [], "--frame"),
    "frame out of range": (_shaped((16, 16, 2, 3)), ["--frame", "5"], "out of range"),
    "zero-size dimension": (_shaped((16, 0, 2)), [], "size 0"),
    "NaN voxels": (_with_nan, [], "3 NaN/Inf voxels"),
    "slice too small": (_shaped((8, 30, 2)), [], "too small"),
    "unknown task": (OK, ["--task", "denoise"], "invalid choice"),
    "weights that do not fit": (OK, ["--weights", "{bad}"], "does not fit"),
    "output folder missing": (OK, ["-o", "{tmp}/missing/o.nii.gz"], "does not exist"),
    "output folder not writable": (OK, ["-o", "{locked}/o.nii.gz"], "not writable"),
    "cuda where there is none": (OK, ["--device", "cuda"], "no CUDA device"),
    "scale for the wrong task": (OK, ["--scale", "2"], "mri_sr only"),
    "bad range": (OK, ["--range", "5", "1"], "LO < HI"),
    "bad axis": (OK, ["--axis", "3"], "out of range"),
}


def _read_only_folder(tmp_path):
    """A folder no one can create files in: /sys (read-only even for root), else a 0500 folder."""
    if os.path.isdir("/sys") and not _can_create(Path("/sys")):
        return "/sys"
    locked = tmp_path.parent / f"{tmp_path.name}-locked"
    locked.mkdir(mode=0o500, exist_ok=True)
    if _can_create(locked):
        pytest.skip("no read-only folder on this machine")
    return str(locked)


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".medir-probe").touch()
    except OSError:
        return False
    (folder / ".medir-probe").unlink()
    return True


@pytest.fixture(scope="module")
def misfit_weights(tmp_path_factory, tiny_weights):
    path = tmp_path_factory.mktemp("weights") / "misfit.pth"
    sd = torch.load(tiny_weights, weights_only=True)
    sd["channel_routing_latent.fc.weight"] = torch.zeros(3, 256)  # a shape no AMIR config has
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, tiny_weights, misfit_weights, case):
    make, extra, pattern = BAD_INPUTS[case]
    if case == "cuda where there is none" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    inp = make(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    extra = [a.format(tmp=tmp_path, bad=misfit_weights, locked=_read_only_folder(tmp_path)) for a in extra]
    task = [] if "--task" in extra else ["--task", "ct_denoise"]
    code, _, err = run_cli(capsys, "infer", inp, "--weights", tiny_weights, *task, *extra)
    assert_one_line_error(code, err, pattern)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no temporary file


def test_no_shipped_weights_or_unknown_name_is_plain(tmp_path, capsys, ct_volume):
    code, _, err = run_cli(capsys, "infer", ct_volume, "--task", "ct_denoise", "--weights", "no-such-model")
    assert_one_line_error(code, err, "not found")
    if not weights.available():
        code, _, err = run_cli(capsys, "infer", ct_volume, "--task", "ct_denoise")
        assert_one_line_error(code, err, "no default weights are shipped")


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["infer", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ["--task", "--weights", "--backend", "--device", "--precision", "--batch-size", "--tile",
                   "--axis", "--scale", "--range", "--frame", "--nan-policy", "--out-dtype", "--overwrite", "--preview",
                   "--series", "--force-task"]:
        assert option in text
    assert "(default: auto)" in text and "float32 (the default)" in " ".join(text.split())


def test_info_lists_versions_backends_and_weights(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert "torch" in out and "eager on" in out and "triton on" in out and "shipped weights" in out
    assert "slim runs in tiles of 80 for ct_denoise, 128 for mri_sr, 64 for pet_synthesis" in out


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "medir_fast.cli"]
    proc = subprocess.run([*exe, "infer", str(tmp_path / "missing.nii"), "--task", "ct_denoise"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"medir-fast: error: input not found: {tmp_path / 'missing.nii'}"


@pytest.mark.parametrize("command", [[], ["infer"], ["train"], ["eval"], ["export"], ["example"]])
def test_help_states_the_one_exit_code_rule(capsys, command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 done; 2 bad input or arguments" in text and "130, 143, 129 interrupted" in text, text


def test_unexpected_failure_is_one_line_exit_1(tmp_path, capsys, ct_volume, monkeypatch):
    import medir_fast.api as api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(api, "_restore", bug)
    code, _, err = run_cli(capsys, "infer", ct_volume, "--task", "ct_denoise", "-o", tmp_path / "o.nii.gz",
                           "--weights", DATA / "tiny_state_dict.pth")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.strip().endswith("(rerun with --debug for the traceback)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


@pytest.mark.parametrize("command, pattern", [
    (["export", "-o", "{tmp}/existing.pt2", "--weights", "{tiny}"], "exists; pass --overwrite"),
    (["export", "-o", "{tmp}/missing/x.pt2", "--weights", "{tiny}"], "engine folder does not exist"),
    (["export", "-o", "{tmp}/x.onnx", "--weights", "{tiny}", "--format", "aoti"], "engine must end in .pt2"),
    (["export", "-o", "{tmp}/x.trt", "--weights", "{tiny}"], "cannot tell the engine format"),
    (["export", "-o", "{tmp}/x.onnx", "--weights", "{tiny}", "--precision", "bf16"], "ONNX's Conv has no bfloat16"),
    (["export", "-o", "{tmp}/x.onnx", "--weights", "{tiny}", "--min-shape", "1x20x16"], "multiples of 8"),
    (["export", "-o", "{tmp}/x.onnx", "--weights", "{tiny}", "--opt-shape", "8x64x64", "--max-shape", "4x64x64"],
     "min <= opt <= max"),
    (["export", "-o", "{tmp}/x.onnx", "--weights", "{tiny}", "--max-shape", "4x64"], "BATCHxHEIGHTxWIDTH"),
    (["export", "-o", "{tmp}/x.engine", "--weights", "{tiny}"], "cannot build a TensorRT engine here"),
    (["export", "-o", "{tmp}/x.pt2", "--weights", "{tmp}/none.pth"], "weights file not found"),
    (["eval", "{tmp}/nowhere", "--no-model", "--json", "{tmp}/existing.pt2"], "exists; pass --overwrite"),
    (["eval", "{tmp}/nowhere", "--no-model"], "data folder not found"),
    (["train", "{tmp}/nowhere", "--out", "{tmp}/run", "--steps", "1", "--crop", "30"], "multiple of 8"),
])
def test_every_subcommand_answers_bad_input_in_one_line_exit_2(tmp_path, capsys, command, pattern):
    (tmp_path / "existing.pt2").write_bytes(b"keep")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path, tiny=DATA / "tiny_state_dict.pth") for a in command])
    assert_one_line_error(code, err, pattern)
    assert err.startswith("medir-fast: error: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (tmp_path / "existing.pt2").read_bytes() == b"keep"
