"""Images in and out: NIfTI (`nifti.py`, nibabel) and DICOM series (`dicom.py`, pydicom), each
read as a `Volume` (lazy slabs, physical units, RAS affine) and written only after checks.

What is supported: NIfTI in, NIfTI out; DICOM in, DICOM out (a derived series); DICOM in, NIfTI
out. A NIfTI input has no patient, study or equipment to derive a DICOM series from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..tasks import Task
from .nifti import (NAN_POLICIES, NIFTI_SUFFIXES, OUT_DTYPES, NiftiVolume, check_header, is_nifti_path,
                    output_header, read_volume, resampled_affine, save_volume, stored_values)
from .volume import Volume, VolumeError


def input_paths(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]


def is_nifti_input(inputs: str | Path | Sequence[str | Path]) -> bool:
    """Whether the input is one NIfTI file (by its name); anything else is read as DICOM."""
    paths = input_paths(inputs)
    return len(paths) == 1 and is_nifti_path(paths[0])


def read_input(inputs: str | Path | Sequence[str | Path], task: Task, frame: int | None = None,
               series: str | None = None, force_task: bool = False, range_given: bool = False) -> Volume:
    """A NIfTI file (`read_volume`; `frame` for 4-D files) or a DICOM series (folders or files;
    `series`, `force_task`, `range_given` as in `dicom.read_series`)."""
    paths = input_paths(inputs)
    if not paths:
        raise VolumeError("no input given")
    if is_nifti_input(paths):
        if series is not None:
            raise VolumeError("--series chooses a DICOM series; the input is a NIfTI file")
        return read_volume(paths[0], frame)
    if any(is_nifti_path(p) for p in paths):
        raise VolumeError("give one NIfTI file, or the folders or files of one DICOM series")
    if frame is not None:
        raise VolumeError("--frame is for 4-D NIfTI input; a DICOM series is chosen with --series")
    from .dicom import read_series

    return read_series(paths, task, series, force_task, range_given)


__all__ = ["NAN_POLICIES", "NIFTI_SUFFIXES", "OUT_DTYPES", "NiftiVolume", "Volume", "VolumeError", "check_header",
           "input_paths", "is_nifti_input", "is_nifti_path", "output_header", "read_input", "read_volume",
           "resampled_affine", "save_volume", "stored_values"]
