"""The Python API: load a model, restore a file. Thin glue over model, io and Restorer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import weights as shipped
from .io import (NAN_POLICIES, NIFTI_SUFFIXES, OUT_DTYPES, Volume, input_paths, is_nifti_input, is_nifti_path,
                 read_input, save_volume)
from .model import AMIR, build_model, read_state_dict, unwrap_state_dict
from .outputs import Outputs
from .restorer import MIN_SIZE, InputError, Restorer
from .tasks import TASKS, Task, get_task

if TYPE_CHECKING:
    from .io.dicom import DicomVolume

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
    input_path: str | Path | Sequence[str | Path],
    output_path: str | Path,
    task: str,
    weights: str | Path | None = None,
    model: AMIR | None = None,
    axis: int | None = None,
    scale: int | None = None,
    intensity_range: tuple[float, float] | None = None,
    frame: int | None = None,
    series: str | None = None,
    force_task: bool = False,
    nan_policy: str = "error",
    out_dtype: str | None = None,
    overwrite: bool = False,
    preview: str | Path | None = None,
    stream: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    **restorer_options,
) -> Path:
    """Restore a NIfTI volume (or 2-D image) or a DICOM series into a new NIfTI file or DICOM
    series with the same geometry.

    input_path: a NIfTI file, or a DICOM series: folders (searched recursively) or files; series
    picks one series by its SeriesInstanceUID, force_task runs a task on another modality's series
    (see `io.dicom.read_series`). output_path: a .nii/.nii.gz file, or (DICOM input only) a folder
    that receives the derived series whole. out_dtype: 'float32' (default) or, for a NIfTI
    input, 'input'; a DICOM series is always written in the input's stored type and rescale.
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
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise InputError(f"unknown output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    if intensity_range is not None:
        task_preset = task_preset.with_range(*intensity_range)
    dicom_in, dicom_out = not is_nifti_input(input_path), not is_nifti_path(output_path)
    if dicom_out and not dicom_in:
        raise InputError(f"a NIfTI input is written as NIfTI: the output must end in {' or '.join(NIFTI_SUFFIXES)} "
                         f"({output_path}); DICOM output needs a DICOM input")
    if dicom_out and out_dtype is not None:
        raise InputError("--out-dtype is for NIfTI output: a derived DICOM series keeps its input's stored type and rescale")
    if dicom_in and out_dtype == "input":
        raise InputError("--out-dtype input needs a NIfTI input: a DICOM series written as NIfTI is float32")
    if dicom_out and Path(output_path).suffix.lower() in (".dcm", ".dicom", ".ima"):
        raise InputError(f"a derived series is a folder of files: give a folder name, not {output_path}")
    with Outputs(input_paths(input_path), overwrite) as outputs:
        output_path = outputs.add(output_path, "output", None if dicom_out else NIFTI_SUFFIXES, folder=dicom_out)
        if preview is not None:
            preview = outputs.add(preview, "preview", (".png",))
        volume = read_input(input_path, task_preset, frame, series, force_task, intensity_range is not None)
        axis = _check_axis(volume, axis)
        if dicom_out:
            volume.check_derivable()
        if dicom_out and scale is not None and axis != volume.slice_axis():
            raise InputError("--scale with --axis other than the series' slices cannot be written as DICOM; write NIfTI")
        weights_name = "a model object" if model is not None else Path(str(weights or "default")).name
        model = model if model is not None else load_model(weights)
        restorer = Restorer(model, task_preset, **restorer_options)

        nonfinite, outside, total = _scan(volume, axis, task_preset)
        if intensity_range is not None and total and outside / total > 0.01:
            log.warning("%.1f%% of voxels fall outside the range [%g, %g] and will be clipped",
                        100 * outside / total, task_preset.lo, task_preset.hi)
        if nonfinite and nan_policy == "error":
            raise InputError(f"{volume.path} has {nonfinite} NaN/Inf voxels; pass --nan-policy zero to replace them with 0")
        for note in getattr(volume, "notes", ()):  # a DICOM reader's, now that the input is accepted
            log.warning("%s", note)
        restored = _restore(volume, axis, restorer, scale, stream, nan_policy if nonfinite else "error", progress)

        if dicom_out:
            from .io.dicom import write_series

            write_series(outputs.temporary(output_path), restored, volume, _series_description(volume, task_preset),
                         _derivation(model, weights_name, task_preset, volume.unit), scale)
        else:
            refine = None
            if scale is not None:
                in_plane = tuple(i for i in range(len(volume.shape)) if i != axis) if len(volume.shape) == 3 else (0, 1)
                refine = (in_plane, scale)
            save_volume(outputs.temporary(output_path), restored, volume, refine, out_dtype or "float32")
        if preview is not None:
            from .preview import write_preview

            write_preview(outputs.temporary(preview), volume, restored, axis, task_preset, scale)
        outputs.commit()
    return output_path


def _series_description(volume: "DicomVolume", task: Task) -> str:
    """"<original> (medir-fast <task>)", the original shortened to fit the 64 characters of a LO."""
    suffix = f" (medir-fast {task.name})"
    original = str(volume.slices[0].header.get("SeriesDescription", "")).strip()
    return (original[: 64 - len(suffix)] + suffix).strip()


def _derivation(model: AMIR, weights_name: str, task: Task, unit: str) -> str:
    """What made a derived series: the tool, the task and range, the model and its weights' sha256."""
    from . import __version__
    from .export.metadata import weights_sha256

    return (f"restored by medir-fast {__version__} ({task.name}, range [{task.lo:g}, {task.hi:g}] {unit}): "
            f"AMIR, weights {weights_name} sha256 {weights_sha256(model)}")


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
