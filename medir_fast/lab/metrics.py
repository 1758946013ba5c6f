"""The official test script's metrics: PSNR, SSIM (11x11 Gaussian, sigma 1.5, zero-padded
'same' maps averaged) and RMSE, after clipping both images to the task's window
(`tasks.Task.window`), with R = max - min of the clipped reference."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] @ g[None, :])[None, None]


def metrics(pred: np.ndarray, target: np.ndarray, window: tuple[float, float]) -> dict[str, float]:
    """PSNR (dB), SSIM and RMSE of one slice after clipping both to `window` (float64)."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"metrics need two 2-D slices of one shape, got {pred.shape} and {target.shape}")
    lo, hi = window
    p = torch.as_tensor(np.clip(np.asarray(pred, np.float64), lo, hi))[None, None]
    t = torch.as_tensor(np.clip(np.asarray(target, np.float64), lo, hi))[None, None]
    r = float(t.max() - t.min())
    mse = float(((p - t) ** 2).mean())
    psnr = 10 * math.log10(r**2 / mse) if mse > 0 and r > 0 else math.inf
    win = _gaussian_window()
    conv = lambda z: F.conv2d(z, win, padding=5)
    mu1, mu2 = conv(p), conv(t)
    s11, s22, s12 = conv(p * p) - mu1**2, conv(t * t) - mu2**2, conv(p * t) - mu1 * mu2
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return {"psnr": psnr, "ssim": float(ssim_map.mean()), "rmse": math.sqrt(mse)}
