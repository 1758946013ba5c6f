"""A few training steps reduce the loss; resuming reproduces an uninterrupted run exactly."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medir_fast.lab import training
from medir_fast.cli import main
from medir_fast.lab.paired import read_pairs
from medir_fast.model import AMIR
from medir_fast.tasks import get_task

from .conftest import TINY

CONFIG = dict(training.CONFIGS["slim"], **TINY)


def _held_out_l1(state_dict, layout) -> float:
    """L1 of the model on fixed crops of the test split, in network units."""
    model = AMIR(**CONFIG)
    model.load_state_dict(state_dict)
    sampler = training.PatchSampler(read_pairs(layout, "test"), 32, np.random.default_rng(123))
    torch.manual_seed(0)
    lq, hq = (torch.cat(stacks) for stacks in zip(*sampler.batch(6)))  # one pair per task, all 32 x 32
    with torch.no_grad():
        return float(F.l1_loss(model.eval()(lq), hq))


def test_training_reduces_held_out_loss(layout, tmp_path):
    torch.manual_seed(0)
    before = _held_out_l1(AMIR(**CONFIG).state_dict(), layout)  # same seed -> the init `train` starts from
    summary = training.train(layout, tmp_path / "run", CONFIG, steps=30, batch_size=3, crop=32, lr=2e-3,
                             save_every=10, progress=False)
    assert summary["finished"] and summary["step"] == 30
    after = _held_out_l1(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"], layout)
    assert after < 0.7 * before, (before, after)


def test_resume_matches_uninterrupted_run(layout, tmp_path):
    kw = dict(config=CONFIG, steps=6, batch_size=3, crop=32, save_every=2, progress=False)
    training.train(layout, tmp_path / "straight", **kw)
    first = training.train(layout, tmp_path / "split", stop_after=4, **kw)
    assert first["step"] == 4 and not first["finished"]
    second = training.train(layout, tmp_path / "split", resume=True, **kw)
    assert second["step"] == 6 and second["finished"]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def test_checkpoint_is_written_atomically(layout, tmp_path, monkeypatch):
    """A crash while saving leaves the previous checkpoint intact and loadable."""
    training.train(layout, tmp_path / "run", CONFIG, steps=2, batch_size=3, crop=32, progress=False)
    good = (tmp_path / "run" / "last.pt").read_bytes()

    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_atomic({"x": torch.zeros(1)}, tmp_path / "run" / "last.pt")
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


def test_cosine_schedule_ends_at_one_percent():
    assert training.cosine_lr(2e-4, 0.0) == pytest.approx(2e-4)
    assert training.cosine_lr(2e-4, 0.5) == pytest.approx(1.01e-4)
    assert training.cosine_lr(2e-4, 1.0) == pytest.approx(2e-6)


def test_cli_trains_and_exports_loadable_weights(layout, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    args = parser.parse_args([str(layout), "--out", str(tmp_path / "cli"), "--config", '{"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1}',
                              "--steps", "2", "--batch-size", "3", "--crop", "32", "--loss", "log-l1"])
    assert training.run(args) == 0
    state = torch.load(tmp_path / "cli" / "weights.pth", weights_only=True)
    AMIR(**CONFIG).load_state_dict(state)
    assert "finished at step 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["loss"] == "log-l1"


def test_a_deeper_config_grows_from_its_init_and_keeps_the_start(layout, tmp_path):
    """--init with more blocks in --config: the run starts from the init weights plus identity
    blocks, written to OUT/init.pth (what `medir_fast.lab.ship_weights --with-init` averages with)."""
    training.train(layout, tmp_path / "small", CONFIG, steps=2, batch_size=3, crop=32, progress=False)
    training.export_weights(tmp_path / "small" / "last.pt", tmp_path / "small.pth")
    deeper = dict(CONFIG, num_blocks=[1, 2, 1, 2])
    training.train(layout, tmp_path / "deep", deeper, steps=2, batch_size=3, crop=32, progress=False,
                   init=str(tmp_path / "small.pth"))
    small = torch.load(tmp_path / "small.pth", weights_only=True)
    start = torch.load(tmp_path / "deep" / "init.pth", weights_only=True)
    assert AMIR(**deeper).load_state_dict(start) is not None
    assert all(torch.equal(start[k], v) for k, v in small.items())
    assert start["latent.1.ffn.project_out.weight"].abs().sum() == 0
    trained = torch.load(tmp_path / "deep" / "last.pt", weights_only=True)["model"]
    assert trained["latent.1.ffn.project_out.weight"].abs().sum() > 0  # the new block learns


@pytest.mark.parametrize("flags,message", [
    (["--crop", "30"], "multiple of 8"),
    (["--crop", "CT=64,MRI=128"], "one per modality"),
    (["--crop", "CT=64,MRI=big,PET=64"], "one per modality"),
    (["--mix", "CT=4,MRI=1"], "share of at least 1 to each modality"),
    (["--mix", "CT=4,MRI=0,PET=2"], "share of at least 1 to each modality"),
    (["--mix", "CT=a,MRI=1,PET=2"], "share of at least 1 to each modality"),
    (["--simulate"], "paired data folder or --simulate"),
    (["--body-ct"], "--body-ct needs --simulate"),
    (["--quiet-body-ct", "0.5"], "--quiet-body-ct needs --body-ct"),
    (["--quiet-body-ct", "2"], "share from 0 to 1"),
    (["--quiet-body-ct", "-0.5"], "share from 0 to 1"),
    (["--ct-dose", "8,0.5"], "--ct-dose must be LO,HI"),
    (["--ct-dose", "0,8"], "--ct-dose must be LO,HI"),
    (["--ct-dose", "low,high"], "--ct-dose must be LO,HI"),
    (["--config", "huge"], "--config must be"),
    (["--modalities", "CT,XR"], "subset"),
    (["--device", "cuda:0"], "CUDA"),
    (["--loss", "l2"], "invalid choice: 'l2'"),
])
def test_cli_bad_options_are_one_line_errors(layout, tmp_path, capsys, flags, message):
    if "cuda:0" in flags and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = main(["train", str(layout), "--out", str(tmp_path / "x"), "--steps", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


def test_crops_larger_than_the_slices_are_mirror_padded_pairs(layout):
    """A 48-pixel crop of 40-pixel slices: input and target padded alike, the data kept in the middle."""
    pairs = read_pairs(layout, "train")
    sampler = training.PatchSampler(pairs, 48, np.random.default_rng(0))
    lq, hq = (torch.cat(stacks) for stacks in zip(*sampler.batch(6)))
    assert lq.shape == hq.shape == (6, 1, 48, 48)
    assert float((lq - hq).abs().mean()) < 0.1  # the fixture's LQ is HQ plus mild noise: still paired
    pet = next(p for p in pairs if p.modality == "PET")
    padded_lq, padded_hq = sampler.slices["PET"][0]
    assert padded_hq.shape == (48, 48)
    np.testing.assert_allclose(padded_hq[4:44, 4:44], get_task("pet_synthesis").normalize(pet.hq[0]), rtol=1e-6)
    np.testing.assert_allclose(padded_lq[4:44, 4:44], get_task("pet_synthesis").normalize(pet.lq[0]), rtol=1e-6)
    np.testing.assert_array_equal(padded_hq[3], padded_hq[5])  # mirrored about the first data row


def test_crops_come_as_one_tensor_pair_per_task(layout):
    """Super-resolution wants context, denoising many crops: sizes per modality, tasks still
    interleaved; one pair per task (CT and PET share a size here), so that a loss can weigh
    crops within their task."""
    sampler = training.PatchSampler(read_pairs(layout, "train"), {"CT": 16, "MRI": 48, "PET": 16}, np.random.default_rng(0))
    groups = sampler.batch(7)
    sizes = sorted((lq.shape[0], lq.shape[-1]) for lq, _ in groups)
    assert sizes in ([(2, 16), (2, 48), (3, 16)], [(2, 16), (2, 16), (3, 48)])  # 7 crops over 3 tasks from a random start
    assert all(lq.shape == hq.shape and lq.shape[1] == 1 for lq, hq in groups)


def test_mix_gives_each_modality_its_share_of_every_batch(layout):
    """CT=4,MRI=1,PET=2 over a batch of 7: exactly those counts, whatever the random start."""
    sampler = training.PatchSampler(read_pairs(layout, "train"), {"CT": 16, "MRI": 48, "PET": 24},
                                    np.random.default_rng(0), mix={"CT": 4, "MRI": 1, "PET": 2})
    for _ in range(5):
        counts = sorted((lq.shape[-1], lq.shape[0]) for lq, _ in sampler.batch(7))
        assert counts == [(16, 4), (24, 2), (48, 1)]
    assert training.parse_mix(None, ("CT", "PET")) is None
    assert training.parse_mix("ct=3, PET=1", ("CT", "PET")) == {"CT": 3, "PET": 1}


def test_l1_crop_loss_is_torch_l1():
    out, target = torch.randn(5, 1, 9, 9, dtype=torch.float64), torch.randn(5, 1, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(training.crop_loss(out, target), torch.nn.functional.l1_loss(out, target))
    with pytest.raises(ValueError, match="l1, log-l1"):
        training.crop_loss(out, target, "l2")


def test_log_l1_weighs_each_crop_by_its_relative_error():
    """Its gradient is that of the mean log L1 over crops, up to one positive factor; with equal
    errors it is plain L1. (Here the crops' errors lie 300x apart, where plain L1 is far from it.)"""
    target = torch.randn(4, 1, 7, 7, dtype=torch.float64)
    out = (target + torch.randn_like(target) * torch.tensor([1e-3, 1e-2, 1e-1, 3e-1]).view(4, 1, 1, 1)).requires_grad_()
    (grad,) = torch.autograd.grad(training.crop_loss(out, target, "log-l1"), out)
    log_mean = (out - target).abs().flatten(1).mean(1).log().mean()
    (expected,) = torch.autograd.grad(log_mean, out)
    factor = (grad.flatten() @ expected.flatten()) / (expected.flatten() @ expected.flatten())
    assert factor > 0
    torch.testing.assert_close(grad, factor * expected, rtol=2e-3, atol=0)  # the 1e-6 that keeps a perfect crop finite
    equal = target + 0.5 * torch.sign(torch.randn_like(target))
    torch.testing.assert_close(training.crop_loss(equal, target, "log-l1"), training.crop_loss(equal, target))


def test_parse_crop():
    assert training.parse_crop("64", ("CT", "PET")) == 64
    assert training.parse_crop("ct=64, MRI=128,PET=64", ("CT", "MRI", "PET")) == {"CT": 64, "MRI": 128, "PET": 64}
    with pytest.raises(ValueError, match="one per modality"):
        training.parse_crop("CT=64,MRI=128,PET=64", ("CT", "PET"))  # MRI named but not trained
