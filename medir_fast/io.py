"""NIfTI in and out (nibabel): geometry kept, slabs read lazily, writes atomic.

A `Volume` wraps a nibabel image without loading its voxels; `slabs()` reads consecutive
groups of slices along an axis, so a large volume is never held whole in float.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener
from nibabel.volumeutils import array_to_file

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A file that cannot be read or written as asked; the message is meant for the user."""


def _read_errors():
    return (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError)


@dataclass
class Volume:
    """A NIfTI image on disk: header and affine, voxels read lazily (one frame of a 4-D image)."""

    path: Path
    image: nib.Nifti1Image
    frame: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.image.shape
        return shape[:3] if self.frame is not None else shape

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine

    @property
    def header(self):
        return self.image.header

    def slice_axis(self) -> int:
        """The voxel axis closest to the patient's superior-inferior direction (per the affine)."""
        if len(self.shape) == 2:
            return 0
        directions = np.abs(self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0))
        return int(np.argmax(directions[2]))

    def slabs(self, axis: int, size: int) -> Iterator[np.ndarray]:
        """Consecutive float32 slabs [n <= size, ...in-plane] along `axis`, in physical units."""
        for start in range(0, self.shape[axis], size):
            yield self.slab(axis, start, min(start + size, self.shape[axis]))

    def slab(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Slices start..stop-1 along `axis` as float32 [n, ...in-plane], in physical units."""
        index = [slice(None)] * len(self.shape)
        index[axis] = slice(start, stop)
        if self.frame is not None:
            index.append(self.frame)
        try:
            slab = np.asarray(self.image.dataobj[tuple(index)], dtype=np.float32)
        except _read_errors() as exc:
            raise VolumeError(f"cannot read the voxels of {self.path} (truncated or corrupt file?): {_first_line(exc)}") from exc
        return np.moveaxis(slab, axis, 0)

    def read(self) -> np.ndarray:
        """The whole volume as float32 (small volumes: 2-D images, previews, tests)."""
        return next(self.slabs(0, self.shape[0]))



def atomic_output(path: Path, suffix: str):
    """A temporary file beside `path` with the permissions a plain create would give (mkstemp's are 0600)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise VolumeError(f"output folder is not writable: {path.parent} ({exc.strerror})") from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path, frame: int | None = None) -> Volume:
    """Open a NIfTI file and check what can be checked without reading every voxel."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"input not found: {path}")
    if not path.is_file():
        raise VolumeError(f"input is not a file: {path}")
    if not is_nifti_path(path):
        raise VolumeError(f"input is not a NIfTI file (.nii or .nii.gz): {path}")
    try:
        image = nib.load(path)
    except _read_errors() as exc:
        raise VolumeError(f"cannot read {path} as NIfTI: {_first_line(exc)}") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path} is not a NIfTI-1/2 image")
    shape = image.shape
    if 0 in shape:
        raise VolumeError(f"{path} has a dimension of size 0 (shape {shape})")
    if len(shape) == 4:
        if frame is None:
            raise VolumeError(f"{path} is 4-D (shape {shape}); choose one frame with --frame N (0..{shape[3] - 1})")
        if not 0 <= frame < shape[3]:
            raise VolumeError(f"--frame {frame} is out of range for {shape[3]} frames")
    elif frame is not None:
        raise VolumeError(f"--frame is only for 4-D input; {path} has shape {shape}")
    elif len(shape) not in (2, 3):
        raise VolumeError(f"{path} has {len(shape)} dimensions (shape {shape}); expected 2-D, 3-D or 4-D with --frame")
    return Volume(path, image, frame)


def resampled_affine(affine: np.ndarray, in_plane_axes: tuple[int, int], factor: int) -> np.ndarray:
    """Affine of the grid refined `factor` times along two voxel axes, covering the same field of view.

    Voxel centres: new index i maps to old continuous index (i + 0.5) / factor - 0.5.
    """
    step = np.eye(4)
    for ax in in_plane_axes:
        step[ax, ax] = 1.0 / factor
        step[ax, 3] = (1.0 / factor - 1.0) / 2.0
    return affine @ step


def output_header(volume: Volume, shape: tuple[int, ...], affine: np.ndarray | None = None):
    """The input's header for an output of `shape`: same codes, units and orientation; the new
    affine (qform and sform, with their codes) when the grid changed."""
    header = volume.header.copy()
    header.set_data_shape(shape)
    if affine is not None:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        header.set_qform(affine, code=qcode or 1)
        header.set_sform(affine, code=scode)
        zooms = list(volume.header.get_zooms()[: len(shape)])
        zooms[:3] = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[: min(3, len(shape))]
        header.set_zooms(zooms)
    if volume.frame is not None:
        header["dim"][0] = 3
        header["dim"][4] = 1
    return header


def write_volume(
    path: str | Path,
    data: np.ndarray,
    volume: Volume,
    affine: np.ndarray | None = None,
    out_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write `data` (physical units) with `volume`'s geometry, atomically: a temporary file in the
    same folder, renamed over the target only once complete.

    out_dtype 'float32' writes floats (no scaling); 'input' casts back to the input's on-disk
    type with its scl_slope/scl_inter, rounding and clipping to the type's range.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise VolumeError(f"output must end in .nii or .nii.gz: {path}")
    if path.resolve() == volume.path.resolve():
        raise VolumeError(f"output {path} is the input; the input is never overwritten")
    if path.exists() and not overwrite:
        raise VolumeError(f"output {path} exists; pass --overwrite to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise VolumeError(f"output folder does not exist: {folder}")

    header = output_header(volume, data.shape, affine)
    if out_dtype == "float32":
        dtype, slope, inter = np.dtype(np.float32), 1.0, 0.0
    elif out_dtype == "input":
        dtype = volume.header.get_data_dtype()
        slope, inter = volume.image.dataobj.slope, volume.image.dataobj.inter
    else:
        raise VolumeError(f"unknown output dtype {out_dtype!r}; use float32 or input")
    header.set_data_dtype(dtype)
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = 0  # let nibabel place the data after the header and its extensions

    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    tmp = atomic_output(path, suffix)
    try:
        with Opener(tmp, "wb") as f:
            header.write_to(f)
            array_to_file(data, f, dtype, header.get_data_offset(), intercept=inter, divslope=slope, order="F")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
