"""NIfTI in and out (nibabel): headers checked first, geometry kept, slabs read lazily,
outputs checked and verified before they are committed.

`read_volume` validates the header (dimensions, datatype, voxel offset, and that the file really
holds the bytes the header claims) before nibabel sizes any buffer from it. A `NiftiVolume` wraps a
nibabel image without loading its voxels; `slabs()` reads consecutive groups of slices along an
axis, so a large volume is never held whole in float. `save_volume` writes in native byte order
only values that are finite and representable in the output type, and reads the file back: every
stored value must be the intended one and scale back to the restored value. The caller commits
the file (`outputs.Outputs`).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.imageglobals import LoggingOutputSuppressor
from nibabel.nifti1 import data_type_codes
from nibabel.openers import Opener
from nibabel.volumeutils import array_to_file, native_code

from ..errors import first_line
from .volume import Volume, VolumeError, as_float32, read_errors


NIFTI_SUFFIXES = (".nii", ".nii.gz")
# NaN or +-Inf voxels in an input, at every layer (restore_file, --nan-policy, the streaming runtime):
# 'error' refuses them (counted); 'zero' replaces them with 0 in physical units before clip-and-scale.
NAN_POLICIES = ("error", "zero")
OUT_DTYPES = ("float32", "input")
HEADER_CLASSES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}  # sizeof_hdr -> header class


class NiftiVolume(Volume):
    """A NIfTI image on disk: header and affine, voxels read lazily (one frame of a 4-D image)."""

    def __init__(self, path: Path, image: nib.Nifti1Image, frame: int | None = None):
        self.path, self.image, self.frame = path, image, frame

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

    def slab(self, axis: int, start: int, stop: int) -> np.ndarray:
        index = [slice(None)] * len(self.shape)
        index[axis] = slice(start, stop)
        if self.frame is not None:
            index.append(self.frame)
        try:
            stored = np.asarray(self.image.dataobj[tuple(index)])
        except read_errors() as exc:
            raise VolumeError(f"cannot read the voxels of {self.path} (truncated or corrupt file?): {first_line(exc)}") from exc
        return np.moveaxis(as_float32(stored), axis, 0)


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def check_header(path: Path) -> None:
    """Check the NIfTI-1/2 header of a .nii or .nii.gz file before any voxel is read.

    Refused, with the reason: no NIfTI-1/2 header, the header of a .hdr/.img pair, dimensions
    that are not 1..7 positive sizes, datatypes that are not real numbers (complex, RGB, binary,
    unknown codes; named), a voxel offset inside the header, and a file that holds fewer bytes
    than the header claims. What is read to decide does not depend on what the header claims:
    the header itself, then (for .nii.gz) the decompressed stream counted in fixed-size chunks.
    """
    try:
        with Opener(path) as f:
            raw = f.read(540)
    except read_errors() as exc:
        raise VolumeError(f"cannot read {path} as NIfTI: {first_line(exc)}") from exc
    found = [(HEADER_CLASSES[int.from_bytes(raw[:4], order)], code)
             for order, code in (("little", "<"), ("big", ">")) if int.from_bytes(raw[:4], order) in HEADER_CLASSES]
    if len(raw) < 348 or not found:
        raise VolumeError(f"cannot read {path} as NIfTI: no NIfTI-1/2 header (truncated or another format?)")
    klass, endianness = found[0]
    if len(raw) < klass.sizeof_hdr:
        raise VolumeError(f"cannot read {path} as NIfTI: the file ends inside its header")
    header = klass(raw[: klass.sizeof_hdr], endianness=endianness, check=False)
    magic = bytes(header["magic"])[:3]
    version = b"1" if klass is nib.Nifti1Header else b"2"
    if magic == b"ni" + version:
        raise VolumeError(f"{path} holds only the header of a .hdr/.img pair; convert the pair to one .nii file")
    if magic != b"n+" + version:
        raise VolumeError(f"cannot read {path} as NIfTI: bad magic {magic!r} for a NIfTI-{version.decode()} header")

    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise VolumeError(f"{path} has an invalid header: dim[0] (the number of dimensions) is {dim[0]}, not 1..7")
    shape = tuple(dim[1: dim[0] + 1])
    if any(n < 0 for n in shape):
        raise VolumeError(f"{path} has an invalid header: negative dimension (shape {shape})")
    if 0 in shape:
        raise VolumeError(f"{path} has a dimension of size 0 (shape {shape})")

    code = int(header["datatype"])
    if code not in data_type_codes.code:
        raise VolumeError(f"{path} has an unknown datatype code {code}")
    label, dtype = data_type_codes.label[code], data_type_codes.dtype[code]
    if dtype.kind not in "uif":
        raise VolumeError(f"{path} holds {label} voxels (datatype {code}); medir-fast restores real-valued "
                          "intensities only")

    offset = float(header["vox_offset"])
    minimum = klass.sizeof_hdr + 4  # the header and the extension flag
    if not math.isfinite(offset) or offset != int(offset) or offset < minimum:
        raise VolumeError(f"{path} has an invalid header: voxel offset {offset:g} (must be a whole number >= {minimum})")
    needed = int(offset) + math.prod(shape) * dtype.itemsize
    available = _bytes_available(path)
    if available < needed:
        raise VolumeError(f"{path} is truncated: its header claims {needed:,} bytes (voxels from byte {int(offset):,}), "
                          f"the file holds {available:,}")


def _bytes_available(path: Path) -> int:
    """How many (decompressed) bytes the file holds. A .nii.gz is decompressed to its end in 1 MiB
    chunks, so that its CRC-32 is checked: a flipped bit inside would otherwise be read as a
    voxel, since nibabel stops reading at the last voxel, before the check."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size
    count = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                count += len(chunk)
    except read_errors() as exc:
        raise VolumeError(f"cannot read {path} (truncated or corrupt file?): {first_line(exc)}") from exc
    return count


def read_volume(path: str | Path, frame: int | None = None) -> NiftiVolume:
    """Open a NIfTI file: the header checked (`check_header`), voxels left on disk."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"input not found: {path}")
    if not path.is_file():
        raise VolumeError(f"input is not a file: {path}")
    if not is_nifti_path(path):
        raise VolumeError(f"input is not a NIfTI file (.nii or .nii.gz): {path}")
    check_header(path)
    try:
        with LoggingOutputSuppressor():  # nibabel logs what it would fix; we have refused it already
            image = nib.load(path)
    except read_errors() as exc:
        raise VolumeError(f"cannot read {path} as NIfTI: {first_line(exc)}") from exc
    if type(image) not in (nib.Nifti1Image, nib.Nifti2Image):
        raise VolumeError(f"{path} is a {type(image).__name__.replace('Image', '')} file, not a NIfTI-1/2 volume")
    shape = image.shape
    if len(shape) == 4:
        if frame is None:
            raise VolumeError(f"{path} is 4-D (shape {shape}); choose one frame with --frame N (0..{shape[3] - 1})")
        if not 0 <= frame < shape[3]:
            raise VolumeError(f"--frame {frame} is out of range for {shape[3]} frames")
    elif frame is not None:
        raise VolumeError(f"--frame is only for 4-D input; {path} has shape {shape}")
    elif len(shape) not in (2, 3):
        raise VolumeError(f"{path} has {len(shape)} dimensions (shape {shape}); expected 2-D, 3-D or 4-D with --frame")
    return NiftiVolume(path, image, frame)


def resampled_affine(affine: np.ndarray, in_plane_axes: tuple[int, int], factor: int) -> np.ndarray:
    """Affine of the grid refined `factor` times along two voxel axes, covering the same field of view.

    Voxel centres: new index i maps to old continuous index (i + 0.5) / factor - 0.5.
    """
    step = np.eye(4)
    for ax in in_plane_axes:
        step[ax, ax] = 1.0 / factor
        step[ax, 3] = (1.0 / factor - 1.0) / 2.0
    return affine @ step


def output_header(volume: Volume, shape: tuple[int, ...], refine: tuple[tuple[int, int], int] | None = None):
    """The input's header, in native byte order, for an output of `shape`: same codes, units,
    orientation and extensions. refine=(in-plane axes, factor): the grid was refined that many
    times along those axes (`resampled_affine`); qform and sform are each carried onto the new
    grid with their own codes (a code of 0 stays 0)."""
    source = volume.header
    header = type(source)(source.as_byteswapped(native_code).binaryblock, native_code, check=False,
                          extensions=source.extensions)
    header.set_data_shape(shape)
    if refine is not None:
        axes, factor = refine
        qform, sform = source.get_qform(), source.get_sform()
        header.set_qform(resampled_affine(qform, axes, factor), code=int(source["qform_code"]))
        header.set_sform(resampled_affine(sform, axes, factor), code=int(source["sform_code"]))
    if volume.frame is not None:
        header["dim"][0] = 3
        header["dim"][4] = 1
    return header


def stored_values(data: np.ndarray, volume: Volume, out_dtype: str) -> tuple[np.ndarray, float, float]:
    """(the array to store, scl_slope, scl_inter) for `data` in physical units.

    out_dtype 'float32' stores floats unscaled; 'input' stores the input's on-disk type with its
    scl_slope/scl_inter, rounded. Refuses (VolumeError, counting them) voxels that are not finite
    or not representable in that type: nothing is clipped silently.
    """
    if out_dtype == "float32":
        dtype, slope, inter = np.dtype(np.float32), 1.0, 0.0
    elif out_dtype == "input":
        dtype = volume.header.get_data_dtype().newbyteorder("=")
        slope, inter = (float(v) for v in (volume.image.dataobj.slope, volume.image.dataobj.inter))
    else:
        raise VolumeError(f"unknown output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    nonfinite = int(data.size - np.count_nonzero(np.isfinite(data)))
    if nonfinite:
        raise VolumeError(f"{nonfinite} of {data.size} output voxels are NaN or infinite; nothing was written")
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            stored = ((data - inter) / slope if (slope, inter) != (1.0, 0.0) else data).astype(dtype, copy=False)
        bad = int(stored.size - np.count_nonzero(np.isfinite(stored)))
    else:
        exact = np.rint((data.astype(np.float64) - inter) / slope)
        info = np.iinfo(dtype)
        # float(info.max) rounds up to 2**63 (2**64) for 64-bit types: bound by max + 1, exclusive
        bad = int(np.count_nonzero((exact < info.min) | (exact >= float(info.max) + 1)))
        stored = exact.astype(dtype) if not bad else None
    if bad:
        raise VolumeError(f"{bad} of {data.size} output voxels do not fit the input's type {dtype.name} (scl_slope "
                          f"{slope:g}, scl_inter {inter:g}); use --out-dtype float32; nothing was written")
    return stored, slope, inter


def save_volume(path: Path, data: np.ndarray, volume: Volume, refine=None, out_dtype: str = "float32") -> None:
    """Write `data` (physical units) with `volume`'s geometry into `path` (a temporary that the
    caller commits), then read it back: every stored value must be the intended one (if not,
    that is a bug here, raised as RuntimeError)."""
    stored, slope, inter = stored_values(data, volume, out_dtype)
    header = output_header(volume, data.shape, refine)
    header.set_data_dtype(stored.dtype)
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = 0  # let nibabel place the data after the header and its extensions
    with Opener(path, "wb") as f:
        header.write_to(f)
        array_to_file(stored, f, stored.dtype, header.get_data_offset(), order="F")
    written = nib.load(path)
    back = np.asarray(written.dataobj.get_unscaled())
    if written.shape != data.shape or not np.array_equal(back, stored) or not _close(back, data, slope, inter):
        raise RuntimeError("the output file does not read back as written (a bug: byte order or type); nothing was written")


def _close(stored: np.ndarray, data: np.ndarray, slope: float, inter: float) -> bool:
    """Whether stored values, scaled back, are `data`: within half a step for integer types, to
    float32 rounding for float types."""
    physical = stored.astype(np.float64) * slope + inter
    if stored.dtype.kind in "ui":
        return bool(np.all(np.abs(physical - data) <= abs(slope) * (0.5 + 1e-9)))
    return bool(np.allclose(physical, data, rtol=2e-7, atol=0.0))
