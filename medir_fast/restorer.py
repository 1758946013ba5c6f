"""The one inference plan every entry point goes through.

`Restorer` owns what lies between a volume in physical units and a backend that runs the
network on normalised, padded batches: slicing along an axis, batching, clip-and-scale,
reflect padding to the network's multiple of 8 (or overlapping tiles blended without seams),
in-plane resampling for `mri_sr`, precision and device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .backends import Backend, make_backend
from .tasks import SCALES, Task, get_task

log = logging.getLogger("medir_fast")

MULTIPLE = 8  # three PixelUnshuffle(2) steps
MIN_SIZE = 9  # the prompt network's two stride-3 convolutions need 9 pixels
MIN_NETWORK_SIZE = 16  # smallest multiple of 8 that is >= MIN_SIZE
OOM_TILE = 256  # the tile a batch is retried in when it does not fit in CUDA memory
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class InputError(ValueError):
    """Input the network cannot take (size, values); the message is meant for the user."""


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; refuse CUDA where there is none."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def precision_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'fp16' (the names of PRECISIONS)."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use auto, {', '.join(PRECISIONS)}") from None


def network_size(n: int) -> int:
    """The padded size the network runs at for a slice dimension of n pixels."""
    return max(MIN_NETWORK_SIZE, math.ceil(n / MULTIPLE) * MULTIPLE)


def check_tile(tile: int) -> None:
    """A tile side the network can run: a multiple of 8 (three 2x downsamplings), at least 16."""
    if tile < MIN_NETWORK_SIZE or tile % MULTIPLE:
        raise ValueError(f"tile must be a multiple of {MULTIPLE} and >= {MIN_NETWORK_SIZE}, got {tile}")


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, n), consecutive tiles overlapping by >= overlap."""
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """Separable weights that ramp from ~0 to 1 over the overlap: neighbouring tiles cross-fade."""
    ramp = torch.ones(tile, dtype=torch.float32)
    if overlap > 0:
        edge = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        ramp[:overlap] = edge
        ramp[-overlap:] = edge.flip(0)
    return ramp[:, None] * ramp[None, :]


class Restorer:
    """Restores 2-D slices and 3-D volumes with an AMIR model for one task.

    backend: 'auto' (the fastest available, logged), 'eager', 'triton', or one that runs an engine
    file built from the model on first use and cached: 'onnxruntime', 'aoti', 'tensorrt'; or a
    backend object (`backends.Backend`), used as it is (the bench's baselines).
    precision: 'auto' (bf16 on CUDA, fp32 on CPU; an engine file's own), 'fp32', 'bf16' or 'fp16'.
    tile: N cuts slices into N x N tiles (multiple of 8) overlapping by N/4 and cross-faded; 0
    runs whole slices; None (the default) runs what `medir-fast infer` runs for these weights:
    the tile shipped weights were validated at for the task (`model.default_tiles`, set by
    `load_model`), whole slices for other weights. AMIR's attention and task prompt are global
    over the input, so tiling changes the result (see README). On CUDA a batch that does not
    fit in memory is retried in 256 x 256 tiles, with a warning; the next batch tries whole again.
    self_ensemble: average the network's output over the 8 flips and quarter turns of each
    slice (each undone before averaging): 8x the compute for a small, free gain in PSNR.
    engine: an engine file to run (`medir-fast export`: .onnx, .pt2 or .engine), by the backend of
    its format; refused unless its metadata says it was built from this model's config and
    weights at this precision, for this device. Slices outside its shape profile are refused.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: str | Task,
        backend: str | Backend = "auto",
        device: str | torch.device = "cpu",
        precision: str = "auto",
        batch_size: int = 8,
        tile: int | None = None,
        self_ensemble: bool = False,
        engine: str | None = None,
    ):
        self.task = get_task(task) if isinstance(task, str) else task
        self.device = resolve_device(device)
        if engine is not None and precision == "auto":  # the engine's own
            from .export.metadata import read_metadata, settings

            precision = settings(read_metadata(engine))["precision"]
        self.dtype = resolve_precision(precision, self.device)
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if tile is None:
            tile = getattr(model, "default_tiles", {}).get(self.task.name)
            if tile:
                log.info("restoring in %dx%d tiles, as the shipped weights were validated for %s (tile 0: whole slices)",
                         tile, tile, self.task.name)
        if tile:
            check_tile(tile)
        self.batch_size = batch_size
        self.tile = tile or None  # None: whole slices
        self._warned_oom = False
        self.self_ensemble = self_ensemble
        if not isinstance(backend, str) and (engine is not None or backend.device != self.device
                                             or backend.dtype != self.dtype):
            raise ValueError(f"backend {backend.name} runs on {backend.device} in {backend.dtype}: give the Restorer "
                             f"that device and precision, and no engine")
        self.backend = (make_backend(backend, model, self.device, self.dtype, engine) if isinstance(backend, str)
                        else backend)
        log.info("backend %s on %s, %s", self.backend.name, self.device, str(self.dtype).replace("torch.", ""))

    # ------------------------------------------------------------------ normalised space

    def restore_normalized(self, slices: np.ndarray) -> np.ndarray:
        """[N, H, W] float32 in [0, 1] -> restored [N, H, W] float32, same space."""
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 3:
            raise InputError(f"expected slices shaped [N, H, W], got shape {slices.shape}")
        h, w = slices.shape[1:]
        if min(h, w) < MIN_SIZE:
            raise InputError(f"slice {h}x{w} is too small: AMIR needs at least {MIN_SIZE}x{MIN_SIZE} pixels")
        out = np.empty_like(slices)
        for start in range(0, len(slices), self.batch_size):
            batch = torch.from_numpy(slices[start:start + self.batch_size]).unsqueeze(1)
            out[start:start + len(batch)] = self._run(batch).squeeze(1).numpy()
        return out

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.self_ensemble:
            return self._run_once(batch)
        total = torch.zeros_like(batch)
        for turns in range(4):
            for flip in (False, True):
                x = torch.rot90(batch, turns, (-2, -1))
                y = self._run_once((x.flip(-1) if flip else x).contiguous())
                total += torch.rot90(y.flip(-1) if flip else y, -turns, (-2, -1))
        return total / 8

    def _run_once(self, batch: torch.Tensor) -> torch.Tensor:
        if self.tile is not None:
            return self._run_tiled(batch, self.tile)
        try:
            return self._run_padded(batch)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if not self._warned_oom:
                log.warning("slices of %dx%d do not fit in %s memory; such a batch is retried in %dx%d tiles, "
                            "one at a time", batch.shape[-2], batch.shape[-1], self.device, OOM_TILE, OOM_TILE)
                self._warned_oom = True
            return self._run_tiled(batch, OOM_TILE, tiles_per_call=1)

    def _run_padded(self, batch: torch.Tensor) -> torch.Tensor:
        """Reflect-pad right and bottom to the network's size, run, crop back."""
        h, w = batch.shape[-2:]
        padded = F.pad(batch, (0, network_size(w) - w, 0, network_size(h) - h), mode="reflect")
        return self.backend.run(padded)[..., :h, :w].cpu()

    def _run_tiled(self, batch: torch.Tensor, tile: int, tiles_per_call: int | None = None) -> torch.Tensor:
        """Overlapping tiles, batched, cross-faded; each tile runs padded as a whole slice would."""
        b, c, h, w = batch.shape
        th, tw = min(tile, h), min(tile, w)
        overlap = tile // 4
        boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
        window = blend_window(tile, overlap)[:th, :tw]
        acc = torch.zeros(b, c, h, w)
        weight = torch.zeros(1, 1, h, w)
        tiles = [batch[..., y:y + th, x:x + tw] for y, x in boxes]
        # as many pixels per network call as batch_size whole slices, unless told
        per_run = tiles_per_call or max(1, (self.batch_size * h * w) // (b * th * tw))
        for i in range(0, len(tiles), per_run):
            restored = self._run_padded(torch.cat(tiles[i:i + per_run])).split(b)
            for (y, x), t in zip(boxes[i:i + per_run], restored):
                acc[..., y:y + th, x:x + tw] += t * window
                weight[..., y:y + th, x:x + tw] += window
        return acc / weight

    # ------------------------------------------------------------------ physical units

    def restore_slices(self, slices: np.ndarray, scale: int | None = None) -> np.ndarray:
        """[N, H, W] in the task's physical units -> restored [N, H', W'] float32, same units.

        scale (mri_sr): the slices were acquired `scale` times coarser in-plane than wanted;
        they are resampled (bicubic) onto the finer grid before the network.
        """
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim == 2:
            return self.restore_slices(slices[None], scale)[0]
        x = self.task.normalize(slices)
        if scale is not None:
            x = upsample(x, scale)
        return self.task.denormalize(self.restore_normalized(x)).astype(np.float32, copy=False)

    def restore_volume(
        self,
        volume: np.ndarray,
        axis: int,
        scale: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Restore a 2-D image or a 3-D volume slice by slice along `axis` (ignored for 2-D)."""
        volume = np.asarray(volume)
        if volume.ndim == 2:
            return self.restore_slices(volume, scale)
        if volume.ndim != 3:
            raise InputError(f"expected a 2-D or 3-D array, got shape {volume.shape}")
        slabs = (np.moveaxis(volume, axis, 0)[i:i + self.batch_size]
                 for i in range(0, volume.shape[axis], self.batch_size))
        return self.restore_slabs(slabs, volume.shape, axis, scale, progress)

    def restore_slabs(
        self,
        slabs: Iterator[np.ndarray],
        shape: tuple[int, ...],
        axis: int,
        scale: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Restore a volume given as consecutive slabs [n, H, W] along `axis`, filling one float32
        output: the input is never held whole, so peak memory is one output plus one batch."""
        in_plane = [n for i, n in enumerate(shape) if i != axis]
        factor = scale or 1
        out_shape = list(shape)
        for i in range(3):
            if i != axis:
                out_shape[i] *= factor
        out = np.empty(out_shape, dtype=np.float32)
        out_slices = np.moveaxis(out, axis, 0)
        done = 0
        for slab in slabs:
            if list(slab.shape[1:]) != in_plane:
                raise InputError(f"slab of shape {slab.shape} does not match the volume's in-plane shape {in_plane}")
            out_slices[done:done + len(slab)] = self.restore_slices(slab, scale)
            done += len(slab)
            if progress is not None:
                progress(len(slab))
        if done != shape[axis]:
            raise InputError(f"got {done} slices, expected {shape[axis]}")
        return out


def upsample(slices: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic in-plane upsampling by an integer factor (pixel centres kept, half-pixel convention)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).unsqueeze(1)
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).squeeze(1).numpy()
