"""The official metrics against an independent float64 reference (scipy convolution)."""

import math

import numpy as np
import pytest

from medir_fast.lab.metrics import metrics
from medir_fast.tasks import get_task

signal = pytest.importorskip("scipy.signal")


def _reference(pred, target, window):
    lo, hi = window
    p, t = np.clip(pred.astype(np.float64), lo, hi), np.clip(target.astype(np.float64), lo, hi)
    r = t.max() - t.min()
    mse = np.mean((p - t) ** 2)
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)
    conv = lambda z: signal.convolve2d(z, win, mode="same", boundary="fill", fillvalue=0)
    mu1, mu2 = conv(p), conv(t)
    s11, s22, s12 = conv(p * p) - mu1**2, conv(t * t) - mu2**2, conv(p * t) - mu1 * mu2
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    ssim = np.mean(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2)))
    return {"psnr": 10 * math.log10(r**2 / mse), "ssim": ssim, "rmse": math.sqrt(mse)}


@pytest.mark.parametrize("modality", ["CT", "MRI", "PET"])
@pytest.mark.parametrize("shape", [(40, 40), (33, 50)])
def test_metrics_match_float64_reference(modality, shape):
    lo, hi = get_task(modality).window
    rng = np.random.default_rng(hash((modality, shape)) % 2**32)
    span = hi - lo
    target = (lo - 0.2 * span + 1.4 * span * rng.random(shape)).astype(np.float32)  # some values outside the window
    pred = (target + 0.05 * span * rng.normal(size=shape)).astype(np.float32)
    ours = metrics(pred, target, (lo, hi))
    ref = _reference(pred, target, (lo, hi))
    for k in ("psnr", "ssim", "rmse"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-10), k


def test_clipping_to_the_window_matters():
    target = np.linspace(-1000, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
    pred = target.copy()
    pred[target < -160] -= 500  # errors only where both are clipped away
    m = metrics(pred, target, get_task("CT").window)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-9)
    pred[32, 32] += 100
    assert math.isfinite(metrics(pred, target, get_task("CT").window)["psnr"])


def test_metrics_reject_mismatched_slices():
    with pytest.raises(ValueError, match="one shape"):
        metrics(np.zeros((8, 8)), np.zeros((8, 9)), (0, 1))
