"""Restorer: padding to any size, tiling, batching, scaling, precision and device choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medir_fast import Restorer, get_task
from medir_fast.restorer import InputError, blend_window, network_size, resolve_device, resolve_precision, tile_starts


def reference_padded(model, x: np.ndarray) -> np.ndarray:
    """What a whole-slice run must equal: reflect-pad right/bottom to a multiple of 8 (>= 16), crop."""
    t = torch.from_numpy(x)[:, None]
    h, w = x.shape[1:]
    t = F.pad(t, (0, network_size(w) - w, 0, network_size(h) - h), mode="reflect")
    with torch.no_grad():
        return model(t)[:, 0, :h, :w].numpy()


@pytest.mark.parametrize("shape", [(2, 37, 61), (1, 400, 192), (3, 9, 9), (1, 16, 24), (2, 13, 40)])
def test_any_size_is_padded_and_cropped(tiny_model, shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape, dtype=np.float32)
    restorer = Restorer(tiny_model, "ct_denoise", backend="eager", batch_size=2)
    out = restorer.restore_normalized(x)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_padded(tiny_model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 64), (64, 5)])
def test_too_small_is_refused(tiny_model, size):
    with pytest.raises(InputError, match="too small"):
        Restorer(tiny_model, "ct_denoise").restore_normalized(np.random.rand(1, *size).astype(np.float32))


def test_physical_units_round_trip_through_task_range(tiny_model):
    task = get_task("ct_denoise")
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1500, 3500, size=(2, 24, 32)).astype(np.float32)  # some outside the range: clipped
    restorer = Restorer(tiny_model, task, backend="eager")
    out = restorer.restore_slices(hu)
    expected = task.denormalize(reference_padded(tiny_model, np.clip((hu + 1024) / 4095, 0, 1)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-2)


def test_volume_along_each_axis_matches_slice_by_slice(tiny_model):
    rng = np.random.default_rng(2)
    vol = rng.uniform(0, 20, size=(17, 19, 21)).astype(np.float32)
    restorer = Restorer(tiny_model, "pet_synthesis", batch_size=4)
    for axis in range(3):
        out = restorer.restore_volume(vol, axis)
        assert out.shape == vol.shape
        k = vol.shape[axis] // 2
        one = restorer.restore_slices(np.take(vol, [k], axis=axis).squeeze(axis))
        np.testing.assert_allclose(np.take(out, k, axis=axis), one, rtol=1e-5, atol=1e-4)


def test_batch_size_does_not_change_the_result(tiny_model):
    vol = np.random.default_rng(3).uniform(0, 4095, size=(5, 24, 24)).astype(np.float32)
    a = Restorer(tiny_model, "mri_sr", batch_size=1).restore_volume(vol, 0)
    b = Restorer(tiny_model, "mri_sr", batch_size=4).restore_volume(vol, 0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_tiles_cover_with_overlap():
    for n, tile in [(100, 32), (37, 16), (32, 32), (20, 32), (512, 256)]:
        starts = tile_starts(n, min(tile, n), tile // 4)
        assert starts[0] == 0 and starts[-1] + min(tile, n) == n
        assert all(b - a <= min(tile, n) - tile // 4 for a, b in zip(starts, starts[1:]))
    w = blend_window(32, 8)
    assert w.min() > 0 and w.max() == 1


def test_tiling_is_seamless_on_an_identity_network(tiny_model):
    """With a network that returns its input, tiled output must equal the input exactly: the blend
    weights sum to one everywhere, so any seam would show."""
    class Identity(torch.nn.Module):
        def forward(self, x):
            return x
    x = np.random.default_rng(4).random((2, 70, 45), dtype=np.float32)
    out = Restorer(Identity(), "ct_denoise", tile=16, batch_size=3).restore_normalized(x)
    np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)


def test_tiled_result_is_close_to_whole_slice(tiny_model):
    x = np.random.default_rng(5).random((1, 64, 80), dtype=np.float32)
    whole = Restorer(tiny_model, "ct_denoise").restore_normalized(x)
    tiled = Restorer(tiny_model, "ct_denoise", tile=32).restore_normalized(x)
    assert not np.allclose(whole, tiled)  # the prompt and attention are global: tiling changes them
    assert np.abs(whole - tiled).mean() < 0.5 * np.abs(whole - x).mean() + 0.05


def test_bad_tile_and_batch_are_refused(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        Restorer(tiny_model, "ct_denoise", tile=20)
    with pytest.raises(ValueError, match="batch size"):
        Restorer(tiny_model, "ct_denoise", batch_size=0)


def test_device_and_precision_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", torch.device("cpu"))


@pytest.mark.parametrize("precision,tol", [("bf16", 2e-2), ("fp16", 5e-3)])
def test_low_precision_on_cpu(tiny_model, precision, tol):
    x = np.random.default_rng(6).random((1, 32, 40), dtype=np.float32)
    ref = Restorer(tiny_model, "ct_denoise").restore_normalized(x)
    out = Restorer(tiny_model, "ct_denoise", precision=precision).restore_normalized(x)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol


def test_unavailable_backend_is_named_not_replaced(tiny_model, monkeypatch):
    from medir_fast.backends import BackendUnavailable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the triton backend is available")
    with pytest.raises(BackendUnavailable, match="triton"):
        Restorer(tiny_model, "ct_denoise", backend="triton")
    assert Restorer(tiny_model, "ct_denoise", backend="auto").backend.name == "onnxruntime"  # on the CPU


def test_mri_sr_upsampling_changes_the_grid(tiny_model):
    x = np.random.default_rng(7).uniform(0, 4095, size=(2, 12, 20)).astype(np.float32)
    out = Restorer(tiny_model, "mri_sr").restore_slices(x, scale=2)
    assert out.shape == (2, 24, 40)


@pytest.mark.parametrize("shape", [(2, 24, 40), (1, 33, 17)])
def test_self_ensemble_averages_the_eight_turns_and_flips(tiny_model, shape):
    """Averaged over the dihedral group with each transform undone, the result commutes with
    turning and flipping the input, which the plain network does not."""
    x = np.random.default_rng(3).random(shape, dtype=np.float32)
    plain = Restorer(tiny_model, "ct_denoise", backend="eager")
    ensemble = Restorer(tiny_model, "ct_denoise", backend="eager", self_ensemble=True)
    out = ensemble.restore_normalized(x)
    expected = np.mean([np.rot90(reference_padded(tiny_model, np.ascontiguousarray(np.rot90(x, k, (1, 2)))), -k, (1, 2))
                        for k in range(4)] +
                       [np.rot90(reference_padded(tiny_model, np.ascontiguousarray(np.rot90(x, k, (1, 2))[..., ::-1]))[..., ::-1], -k, (1, 2))
                        for k in range(4)], axis=0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    turned = np.ascontiguousarray(np.rot90(x, 1, (1, 2))[..., ::-1])
    np.testing.assert_allclose(ensemble.restore_normalized(turned), np.rot90(out, 1, (1, 2))[..., ::-1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(plain.restore_normalized(turned), np.rot90(plain.restore_normalized(x), 1, (1, 2))[..., ::-1], atol=1e-4)


def test_out_of_memory_retries_that_batch_in_tiles_only(tiny_model, monkeypatch, caplog):
    """A CUDA out-of-memory error on a whole-slice batch: that batch runs in 256 x 256 tiles (one
    tile per call); the next batch tries whole slices again; one warning."""
    restorer = Restorer(tiny_model, "ct_denoise", batch_size=1)
    restorer.device = torch.device("cuda")  # the retry is for CUDA memory; the network still runs on the CPU
    sizes, real = [], restorer._run_padded

    def flaky(batch):
        sizes.append(tuple(batch.shape[-2:]))
        if batch.shape[-1] == 296 and sizes.count((296, 296)) == 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(batch)
    monkeypatch.setattr(restorer, "_run_padded", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    x = np.random.default_rng(0).uniform(0, 1, (2, 296, 296)).astype(np.float32)
    out = restorer.restore_normalized(x)
    assert sizes[0] == (296, 296) and sizes[1:5] == [(256, 256)] * 4 and sizes[5] == (296, 296)
    assert restorer.tile is None and out.shape == x.shape and np.isfinite(out).all()
    assert caplog.text.count("do not fit") == 1
