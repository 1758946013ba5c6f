"""What every input format ends in: a `Volume`, voxels read lazily in slabs, in physical units,
with a RAS+ affine (NIfTI's convention; DICOM's LPS is converted in `dicom.py`)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

F32_MAX = float(np.finfo(np.float32).max)


class VolumeError(ValueError):
    """A file that cannot be read or written as asked; the message is meant for the user."""


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or hostile file raises, turned into a VolumeError by the readers."""
    return (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError)


def as_float32(stored: np.ndarray) -> np.ndarray:
    """Stored values as float32. Finite values beyond float32 become its largest value, not inf:
    they are clipped to the task's range like any other value, while a stored NaN or inf stays one."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = stored.astype(np.float32)
    if stored.dtype.kind == "f" and stored.dtype.itemsize > 4:
        overflow = np.isinf(values) & np.isfinite(stored)
        values[overflow] = np.copysign(F32_MAX, stored[overflow])
    return values


class Volume:
    """A 2-D or 3-D image on disk. Subclasses give `path`, `shape`, `affine` (voxel -> RAS+ mm),
    `frame` (the frame of a 4-D file, or None) and `slab`."""

    path: Path
    frame: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def affine(self) -> np.ndarray:
        raise NotImplementedError

    def slab(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Slices start..stop-1 along `axis` as float32 [n, ...in-plane], in physical units."""
        raise NotImplementedError

    def slice_axis(self) -> int:
        """The voxel axis closest to the patient's superior-inferior direction (per the affine)."""
        if len(self.shape) == 2:
            return 0
        with np.errstate(all="ignore"):  # a degenerate (zero or huge) column counts as no direction
            directions = np.nan_to_num(np.abs(self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)))
        return int(np.argmax(directions[2]))

    def slabs(self, axis: int, size: int) -> Iterator[np.ndarray]:
        """Consecutive float32 slabs [n <= size, ...in-plane] along `axis`, in physical units."""
        for start in range(0, self.shape[axis], size):
            yield self.slab(axis, start, min(start + size, self.shape[axis]))

    def read(self) -> np.ndarray:
        """The whole volume as float32 (small volumes: 2-D images, previews, tests)."""
        return next(self.slabs(0, self.shape[0]))
