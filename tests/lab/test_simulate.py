"""Protocol v1: the torch projector against skimage, the MRI and PET degradations."""

import numpy as np
import pytest
import torch

from medir_fast.lab import simulate

skimage_transform = pytest.importorskip("skimage.transform")


def _phantom(h, w, seed):
    rng = np.random.default_rng(seed)
    img = 0.1 * rng.random((h, w))
    img[h // 5: 4 * h // 5, w // 4: 3 * w // 4] += rng.random((4 * h // 5 - h // 5, 3 * w // 4 - w // 4))
    return img


@pytest.mark.parametrize("h,w", [(32, 32), (37, 37), (24, 40)])
def test_radon_matches_skimage_float64(h, w):
    img = _phantom(h, w, seed=h * w)
    theta = np.arange(simulate.CT_VIEWS) * 180 / simulate.CT_VIEWS
    ref = skimage_transform.radon(img, theta=theta, circle=False)
    ours = simulate.radon(torch.tensor(img)[None])[0].numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("n", [32, 45])
def test_iradon_matches_skimage_float64(n):
    img = _phantom(n, n, seed=n)
    theta = np.arange(simulate.CT_VIEWS) * 180 / simulate.CT_VIEWS
    sino = skimage_transform.radon(img, theta=theta, circle=False)
    ref = skimage_transform.iradon(sino, theta=theta, circle=False, filter_name="ramp", interpolation="linear", output_size=n)
    ours = simulate.iradon(torch.tensor(sino)[None], n)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_projector_float32_batched_matches_float64():
    imgs = np.stack([_phantom(32, 32, s) for s in range(3)])
    sino64 = simulate.radon(torch.tensor(imgs))
    sino32 = simulate.radon(torch.tensor(imgs, dtype=torch.float32))
    torch.testing.assert_close(sino32.double(), sino64, rtol=0, atol=1e-5 * float(sino64.abs().max()))
    rec32 = simulate.iradon(sino32, 32)
    rec64 = simulate.iradon(sino64, 32)
    torch.testing.assert_close(rec32.double(), rec64, rtol=0, atol=1e-4 * float(rec64.abs().max()))


def test_ct_pair_noise_falls_with_dose():
    """Target = noiseless FBP (close to the HU phantom inside), input noise ~ 1/sqrt(I0)."""
    hu = np.full((32, 32), -1000.0, np.float32)
    hu[6:26, 6:26] = 40.0  # soft tissue block in air
    noisy, target = simulate.simulate_ct(hu, pixel_mm=1.0, seed=1)
    assert abs(float(np.median(target[10:22, 10:22])) - 40.0) < 15.0
    low = np.std(simulate.simulate_ct(hu, 1.0, seed=2, i0=3e3)[0][10:22, 10:22] - target[10:22, 10:22])
    high = np.std(noisy[10:22, 10:22] - target[10:22, 10:22])
    assert 5 < low / high < 20  # 100x the dose: ~10x less noise
    again = simulate.simulate_ct(hu, 1.0, seed=1)[0]
    np.testing.assert_array_equal(again, noisy)


@pytest.mark.parametrize("scale", [2, 4])
def test_mri_truncation_keeps_exactly_the_central_block(scale):
    rng = np.random.default_rng(scale)
    h, w = 30, 22
    kh, kw = -(-h // scale), -(-w // scale)
    r0, c0 = h // 2 - kh // 2, w // 2 - kw // 2
    inside = np.zeros((h, w), complex)
    inside[r0:r0 + kh, c0:c0 + kw] = rng.normal(size=(kh, kw)) + 1j * rng.normal(size=(kh, kw))
    outside = np.fft.fftshift(np.fft.fft2(rng.normal(size=(h, w))))
    outside[r0:r0 + kh, c0:c0 + kw] = 0
    low = np.fft.ifft2(np.fft.ifftshift(inside))
    image = low + np.fft.ifft2(np.fft.ifftshift(outside))
    # the magnitude is taken of the truncated complex image: compare with |low part|
    out = simulate.simulate_mri(image.real[None], scale)[0]
    expect = np.abs(np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(image.real)) * (np.abs(inside) > 0))))
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    flat = simulate.simulate_mri(np.full((1, h, w), 7.0), scale)[0]  # DC only: kept exactly
    np.testing.assert_allclose(flat, 7.0, rtol=1e-6)
    assert np.abs(out - np.abs(image.real)).max() > 0.1  # the high frequencies are really gone


def test_scalings_hit_their_percentiles():
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, 50.0, size=(8, 20, 20))
    vol[:, :5] = 0
    mri = simulate.scale_mri(vol)
    assert np.percentile(mri[mri != 0], 99.5) == pytest.approx(2000, rel=1e-4)
    pet = simulate.scale_pet(vol)
    assert np.percentile(pet, 99.9) == pytest.approx(8, rel=1e-4)


def test_pet_dose_reduction_is_unbiased_and_reproducible():
    target = np.full((4, 64, 64), 4.0)
    noisy = simulate.simulate_pet(target, seed=3)
    assert float(noisy.mean()) == pytest.approx(4.0, rel=0.02)
    raw_var = 4.0 * simulate.PET_DOSE_FACTOR  # Var(Poisson(S/f) f) = S f
    assert 0.05 * raw_var < float(noisy.var()) < 0.5 * raw_var  # the Gaussian smoothing removed most of it
    np.testing.assert_array_equal(noisy, simulate.simulate_pet(target, seed=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the projector's GPU path)")
def test_ct_projector_on_cuda_matches_cpu():
    hu = np.where(np.hypot(*(np.mgrid[:48, :48] - 23.5)) < 18, 40.0, -1000.0)[None].astype(np.float32)
    _, target_cpu = simulate.simulate_ct(hu, pixel_mm=0.9, seed=0)
    lq_gpu, target_gpu = simulate.simulate_ct(hu, pixel_mm=0.9, seed=0, device="cuda")
    np.testing.assert_allclose(target_gpu, target_cpu, rtol=0, atol=0.05)  # HU; float32 on both
    assert 1 < float(np.std(lq_gpu - target_gpu)) < 200
