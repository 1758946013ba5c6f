"""The Python API: load a model, restore a file. Thin glue over model, io and Restorer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import weights as shipped
from .io import NAN_POLICIES, NIFTI_SUFFIXES, OUT_DTYPES, Volume, read_volume, save_volume
from .model import AMIR, build_model, read_state_dict, unwrap_state_dict
from .outputs import Outputs
from .restorer import MIN_SIZE, InputError, Restorer
from .tasks import TASKS, get_task

log = logging.getLogger("medir_fast")


def read_weights(weights: str | Path | dict | None = None) -> tuple[dict, dict | None, dict[str, int], str]:
    """The one resolver of a weights argument: (state dict, config or None, tiles, source).

    weights: None or "default" for the shipped default, the name of a shipped model ("slim"), a
    checkpoint path (plain state dict, `{'state_dict': ...}`, `{'model': ...}`, `module.`
    prefixes; integrity-checked), or a state dict. A shipped model brings its config and the
    tiles ({task: tile}) it was validated at; other weights bring neither.
    """
    name = None if isinstance(weights, dict) else shipped.shipped_name(weights)
    if name is not None or weights is None or weights == "default":
        state_dict, config = shipped.load(name)
        return state_dict, config, shipped.tiles(name), f"shipped weights {name!r}"
    if isinstance(weights, dict):
        return unwrap_state_dict(weights), None, {}, "state dict"
    return read_state_dict(weights), None, {}, str(weights)


def load_model(weights: str | Path | dict | None = None, config: dict | None = None, device: str = "cpu") -> AMIR:
    """An eval-mode AMIR on `device` holding `weights` (see `read_weights`). config: the AMIR
    constructor arguments; inferred from the checkpoint when omitted. The model's `default_tiles`
    are the shipped weights' tiles (empty for other weights): what `Restorer` runs when it is
    given no tile.
    """
    state_dict, shipped_config, tiles, source = read_weights(weights)
    model = build_model(state_dict, config or shipped_config, source=source)
    model.default_tiles = tiles
    return model.to(device)


def restore_file(
    input_path: str | Path,
    output_path: str | Path,
    task: str,
    weights: str | Path | None = None,
    model: AMIR | None = None,
    axis: int | None = None,
    scale: int | None = None,
    intensity_range: tuple[float, float] | None = None,
    frame: int | None = None,
    nan_policy: str = "error",
    out_dtype: str = "float32",
    overwrite: bool = False,
    preview: str | Path | None = None,
    stream: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    **restorer_options,
) -> Path:
    """Restore a NIfTI volume (or 2-D image) into a new NIfTI file with the same geometry.

    restorer_options go to `Restorer` (backend, device, precision, batch_size, tile, self_ensemble),
    with the same meanings there.
    stream: run the slices through the C++ streaming runtime (file reading overlaps compute).
    progress, if given, is called as progress(total_slices, axis) and returns a per-batch
    callback taking the number of slices done.

    Every option, the input's header and every output path (the volume, the preview) are checked
    before any computation; the outputs are checked (finite, representable) and read back before
    they are committed together. Raises VolumeError / OutputError / InputError / ValueError with a
    message meant for the user; on any error or interruption nothing is written and no temporary
    file is left.
    """
    task_preset = get_task(task)
    if scale is not None and scale not in task_preset.scales:
        takers = {t.name: t.scales for t in TASKS.values() if t.scales}
        raise InputError(f"--scale applies to {', '.join(takers)} only, with a value in "
                         f"{', '.join(map(str, sorted({s for v in takers.values() for s in v})))}")
    if stream and scale is not None:
        raise InputError("--stream does not resample: leave out --scale or --stream")
    if nan_policy not in NAN_POLICIES:
        raise InputError(f"unknown NaN policy {nan_policy!r}; use one of {', '.join(NAN_POLICIES)}")
    if out_dtype not in OUT_DTYPES:
        raise InputError(f"unknown output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    if intensity_range is not None:
        task_preset = task_preset.with_range(*intensity_range)
    volume = read_volume(input_path, frame=frame)
    axis = _check_axis(volume, axis)
    with Outputs([volume.path], overwrite) as outputs:
        output_path = outputs.add(output_path, "output", NIFTI_SUFFIXES)
        if preview is not None:
            preview = outputs.add(preview, "preview", (".png",))
        restorer = Restorer(model if model is not None else load_model(weights), task_preset, **restorer_options)

        nonfinite, outside, total = _scan(volume, axis, task_preset)
        if intensity_range is not None and total and outside / total > 0.01:
            log.warning("%.1f%% of voxels fall outside the range [%g, %g] and will be clipped",
                        100 * outside / total, task_preset.lo, task_preset.hi)
        if nonfinite and nan_policy == "error":
            raise InputError(f"{volume.path} has {nonfinite} NaN/Inf voxels; pass --nan-policy zero to replace them with 0")
        restored = _restore(volume, axis, restorer, scale, stream, nan_policy if nonfinite else "error", progress)

        refine = None
        if scale is not None:
            in_plane = tuple(i for i in range(len(volume.shape)) if i != axis) if len(volume.shape) == 3 else (0, 1)
            refine = (in_plane, scale)
        save_volume(outputs.temporary(output_path), restored, volume, refine, out_dtype)
        if preview is not None:
            from .preview import write_preview

            write_preview(outputs.temporary(preview), volume, restored, axis, task_preset, scale)
        outputs.commit()
    return output_path


def _restore(volume: Volume, axis: int, restorer: Restorer, scale, stream: bool, nan_policy: str, progress) -> np.ndarray:
    """The restored volume (float32, physical units), read slab by slab. NaN/Inf voxels (only
    with nan_policy 'zero') become 0 here, or in the runtime when streaming."""
    finite = (lambda a: np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)) if nan_policy == "zero" else (lambda a: a)
    on_batch = progress(volume.shape[axis] if len(volume.shape) == 3 else 1, axis) if progress else None
    if len(volume.shape) == 2:
        restored = restorer.restore_slices(finite(volume.read()), scale)
        if on_batch:
            on_batch(1)
        return restored
    if stream:
        from .runtime import restore_slabs_streaming

        slabs = volume.slabs(axis, restorer.batch_size)
        return restore_slabs_streaming(restorer, slabs, volume.shape, axis, on_batch, nan_policy=nan_policy)
    slabs = (finite(s) for s in volume.slabs(axis, restorer.batch_size))
    return restorer.restore_slabs(slabs, volume.shape, axis, scale, on_batch)


def _check_axis(volume: Volume, axis: int | None) -> int:
    """The slicing axis, checked, and slices along it large enough for the network."""
    ndim = len(volume.shape)
    if ndim == 2:
        axis, in_plane = 0, volume.shape
    else:
        if axis is None:
            axis = volume.slice_axis()
        if not 0 <= axis < ndim:
            raise InputError(f"--axis {axis} is out of range for a {ndim}-D volume (0..{ndim - 1})")
        in_plane = [n for i, n in enumerate(volume.shape) if i != axis]
    if min(in_plane) < MIN_SIZE:
        raise InputError(f"{volume.path}: slices along axis {axis} are {in_plane[0]}x{in_plane[1]}, too small: AMIR needs "
                         f"at least {MIN_SIZE}x{MIN_SIZE} pixels")
    return axis


def _scan(volume: Volume, axis: int, task) -> tuple[int, int, int]:
    """One pass over the voxels before any computation: (NaN/Inf count, finite voxels outside the
    task's range, finite voxels). Also surfaces a truncated file before anything is written."""
    nonfinite = outside = total = 0
    for slab in volume.slabs(axis, 64):
        finite = np.isfinite(slab)
        values = slab[finite]
        nonfinite += slab.size - values.size
        total += values.size
        outside += int(np.count_nonzero((values < task.lo) | (values > task.hi)))
    return nonfinite, outside, total


__all__ = ["load_model", "read_weights", "restore_file"]
