"""Degradation protocol v1, so that results are reproducible.

CT low dose: parallel-beam projection of the attenuation map (360 views over [0, 180) degrees,
full field, detector sampled at the pixel size), Poisson counts with I0 = 3e5 per ray, ramp
filtered back-projection; the target is the same reconstruction of the noiseless sinogram.
The projector follows `skimage.transform.radon/iradon` (bilinear rotation, ramp filter,
linear interpolation) but runs batched in torch; a test checks it against skimage.
MRI x2/x4: k-space truncation to the central ceil(H/s) x ceil(W/s) coefficients.
PET 12x dose reduction: Poisson(S x 14/12) x 12/14, then an in-plane Gaussian (sigma 0.8).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..tasks import SCALES

MU_WATER = 0.0192  # mm^-1, attenuation of water at the protocol's effective energy
CT_I0 = 3e5
CT_VIEWS = 360
MRI_TARGET_P995 = 2000.0
PET_TARGET_P999 = 8.0
PET_DOSE_FACTOR = 12.0 / 14.0  # input counts are Poisson(S / PET_DOSE_FACTOR) * PET_DOSE_FACTOR
PET_SIGMA = 0.8

_ANGLE_CHUNK = 45  # views per grid_sample call: bounds memory at ~D*D*45 samples per slice


# --------------------------------------------------------------------------- CT projector


def _angles(n_views: int, device) -> torch.Tensor:
    return torch.arange(n_views, dtype=torch.float64, device=device) * (math.pi / n_views)


def radon(image: torch.Tensor, n_views: int = CT_VIEWS) -> torch.Tensor:
    """Parallel-beam line integrals (in pixels) of `image` [B,H,W] -> sinogram [B,D,views].

    Same geometry as `skimage.transform.radon(image, theta, circle=False)`: the image is
    padded to the square of side D = ceil(sqrt(2) * max(H, W)) and each view rotates it
    about pixel D // 2 (bilinear, zeros outside) and sums along rows.
    """
    b, h, w = image.shape
    d = math.ceil(math.sqrt(2) * max(h, w))
    pads = [(d // 2 - s // 2, d - s - (d // 2 - s // 2)) for s in (h, w)]
    padded = F.pad(image, (*pads[1], *pads[0]))[:, None]  # [B,1,D,D]
    c = d // 2
    axis = torch.arange(d, dtype=torch.float64, device=image.device)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    out = []
    for chunk in _angles(n_views, image.device).split(_ANGLE_CHUNK):
        cos, sin = chunk.cos()[:, None, None], chunk.sin()[:, None, None]
        # skimage's inverse map: output (x, y) samples the input at R (x - c, y - c) + c.
        x_in = cos * (xs - c) + sin * (ys - c) + c
        y_in = -sin * (xs - c) + cos * (ys - c) + c
        grid = torch.stack([x_in, y_in], -1) * (2.0 / (d - 1)) - 1.0  # [A,D,D,2], align_corners
        grid = grid.to(image.dtype).reshape(1, -1, d, 2).expand(b, -1, -1, -1)
        rotated = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(rotated.reshape(b, len(chunk), d, d).sum(2))  # [B,A,D]: sum over rows
    return torch.cat(out, 1).transpose(1, 2)


def _ramp_filter(size: int, dtype, device) -> torch.Tensor:
    """skimage's ramp filter: the spatially sampled ramp, so no DC offset."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    return torch.as_tensor(2 * np.real(np.fft.fft(f)), dtype=dtype, device=device)


def iradon(sinogram: torch.Tensor, output_size: int) -> torch.Tensor:
    """Ramp-filtered back-projection [B,D,views] -> [B,N,N], as `skimage.transform.iradon`."""
    b, d, n_views = sinogram.shape
    size = max(64, int(2 ** math.ceil(math.log2(2 * d))))
    spectrum = torch.fft.fft(F.pad(sinogram, (0, 0, 0, size - d)), dim=1)
    filtered = torch.fft.ifft(spectrum * _ramp_filter(size, sinogram.dtype, sinogram.device)[:, None], dim=1).real[:, :d]
    filtered = filtered.transpose(1, 2)  # [B,views,D]
    radius = output_size // 2
    grid = torch.arange(output_size, dtype=torch.float64, device=sinogram.device) - radius
    xpr, ypr = torch.meshgrid(grid, grid, indexing="ij")
    recon = sinogram.new_zeros(b, output_size * output_size)
    for start, chunk in zip(range(0, n_views, _ANGLE_CHUNK), _angles(n_views, sinogram.device).split(_ANGLE_CHUNK)):
        t = ypr[None] * chunk.cos()[:, None, None] - xpr[None] * chunk.sin()[:, None, None] + d // 2
        t = t.reshape(len(chunk), -1)  # detector coordinate of every pixel, per view
        i0 = t.floor().long()
        frac = (t - i0).to(sinogram.dtype)
        proj = filtered[:, start:start + len(chunk)]
        ok0 = ((i0 >= 0) & (i0 < d)).to(sinogram.dtype)
        ok1 = ((i0 + 1 >= 0) & (i0 + 1 < d)).to(sinogram.dtype)
        v0 = proj.gather(2, i0.clamp(0, d - 1).expand(b, -1, -1)) * ok0
        v1 = proj.gather(2, (i0 + 1).clamp(0, d - 1).expand(b, -1, -1)) * ok1
        inside = ((t >= 0) & (t <= d - 1)).to(sinogram.dtype)  # np.interp(left=0, right=0)
        recon += ((v0 * (1 - frac) + v1 * frac) * inside).sum(1)
    return recon.reshape(b, output_size, output_size) * (math.pi / (2 * n_views))


def simulate_ct(hu: np.ndarray, pixel_mm: float, seed: int | None = None, i0: float = CT_I0,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Low-dose CT pair (input, target) in HU for slices `hu` [N,H,W] (or one [H,W] slice)."""
    single = hu.ndim == 2
    x = torch.as_tensor(np.asarray(hu, dtype=np.float32)[None] if single else np.asarray(hu, np.float32), device=device)
    h, w = x.shape[-2:]
    mu = MU_WATER * (1 + x / 1000).clamp(min=0)
    p = radon(mu) * pixel_mm  # line integrals, dimensionless
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
    counts = torch.poisson((i0 * torch.exp(-p.double())).float(), generator=gen).clamp(min=1)
    p_noisy = -torch.log(counts / i0)
    n = max(h, w)
    r0, c0 = n // 2 - h // 2, n // 2 - w // 2
    to_hu = lambda s: (1000 * (iradon(s / pixel_mm, n) / MU_WATER - 1))[:, r0:r0 + h, c0:c0 + w]
    pair = to_hu(p_noisy).cpu().numpy(), to_hu(p).cpu().numpy()
    return (pair[0][0], pair[1][0]) if single else pair


# --------------------------------------------------------------------------- MRI and PET


def scale_mri(volume: np.ndarray) -> np.ndarray:
    """Scale so the 99.5th percentile of the non-zero voxels is 2000."""
    volume = np.asarray(volume, dtype=np.float64)
    nonzero = volume[volume != 0]
    if nonzero.size == 0:
        raise ValueError("MRI volume has no non-zero voxels")
    return (volume * (MRI_TARGET_P995 / np.percentile(nonzero, 99.5))).astype(np.float32)


def simulate_mri(slices: np.ndarray, scale: int) -> np.ndarray:
    """k-space truncation: keep the central ceil(H/s) x ceil(W/s) coefficients, |IFFT| on the same grid.

    `slices` [..., H, W] are the (already scaled) targets; returns the degraded input.
    """
    if scale not in SCALES:
        raise ValueError(f"MRI scale must be one of {SCALES}, got {scale}")
    x = np.asarray(slices, dtype=np.float64)
    h, w = x.shape[-2:]
    k = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    kh, kw = math.ceil(h / scale), math.ceil(w / scale)
    r0, c0 = h // 2 - kh // 2, w // 2 - kw // 2
    mask = np.zeros((h, w), dtype=bool)
    mask[r0:r0 + kh, c0:c0 + kw] = True
    out = np.fft.ifft2(np.fft.ifftshift(k * mask, axes=(-2, -1)))
    return np.abs(out).astype(np.float32)


def scale_pet(volume: np.ndarray) -> np.ndarray:
    """Scale so the 99.9th percentile is 8 (SUV-like)."""
    volume = np.asarray(volume, dtype=np.float64)
    p = np.percentile(volume, 99.9)
    if not p > 0:
        raise ValueError("PET volume has no positive uptake at its 99.9th percentile")
    return (np.clip(volume, 0, None) * (PET_TARGET_P999 / p)).astype(np.float32)


def simulate_pet(slices: np.ndarray, seed: int | None = None) -> np.ndarray:
    """12x dose reduction of the (already scaled) standard-dose slices [..., H, W]."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    s = np.clip(np.asarray(slices, dtype=np.float64), 0, None)
    noisy = rng.poisson(s / PET_DOSE_FACTOR) * PET_DOSE_FACTOR
    sigma = (0,) * (noisy.ndim - 2) + (PET_SIGMA, PET_SIGMA)
    return gaussian_filter(noisy, sigma=sigma).astype(np.float32)
