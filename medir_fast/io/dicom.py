"""DICOM in and out (pydicom): one CT, MR or PET series read as a `Volume`, the restored volume
written as a new derived series.

Reading (`read_series`): every file under the given folders (file names say nothing about
order) has its header read; objects that are not CT, MR or PET images (SR, RTSTRUCT, SEG,
presentation states, DICOMDIR) are set aside with a note. One series must remain, or be chosen
with `series`. Slices (single-frame instances, or the frames of enhanced multi-frame ones) are
placed by ImagePositionPatient along the normal of ImageOrientationPatient and checked to form
one regular grid. The voxel array is NIfTI's: axis 0 along a row (DICOM columns), axis 1 down
the columns, axis 2 the slices in increasing position along the normal; `LPS_TO_RAS` turns the
LPS geometry into the RAS affine, here only. Values are physical: CT in HU (the modality
rescale), PET in SUV body weight (from the activity in Bq/ml, the patient's weight and the
decayed injected dose), MR as stored after its rescale. Pixels are decoded slab by slab.

Writing (`write_series`): one instance per input instance, its header copied (patient, study,
equipment, geometry, acquisition and PET dose modules), marked DERIVED\\SECONDARY (enhanced
multi-frame: DERIVED\\PRIMARY, as their IODs require, and DERIVED frames) with new series and
instance UIDs, a reference to its source instance and a DerivationDescription naming
the model's weights; pixels in the input's stored type and rescale (PET: a new rescale slope per
instance), Explicit VR Little Endian, then read back and compared.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.valuerep import DS, TM, DA

from ..errors import first_line
from ..tasks import Task
from .nifti import is_nifti_path
from .volume import Volume, VolumeError

log = logging.getLogger("medir_fast")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes (L, P, S) -> NIfTI's (R, A, S); its own inverse
IMAGE_STORAGE = {  # the SOP classes medir-fast restores -> DICOM Modality
    uids.CTImageStorage: "CT", uids.EnhancedCTImageStorage: "CT", uids.LegacyConvertedEnhancedCTImageStorage: "CT",
    uids.MRImageStorage: "MR", uids.EnhancedMRImageStorage: "MR", uids.LegacyConvertedEnhancedMRImageStorage: "MR",
    uids.PositronEmissionTomographyImageStorage: "PT", uids.EnhancedPETImageStorage: "PT",
    uids.LegacyConvertedEnhancedPETImageStorage: "PT",
}
POSITION_TOLERANCE_MM = 1e-3  # slices closer than this along the normal are at the same position
ORIENTATION_TOLERANCE = 1e-4  # direction cosines that differ by less are the same orientation
SHEAR_TOLERANCE_MM = 1e-2  # slice origins off the normal through the first by more: a tilted gantry
SPACING_JITTER_SILENT = 1e-3  # relative deviation of a gap from the mean spacing: below, nothing said
SPACING_JITTER_WARNED = 1e-2  # up to this, a warning (the NIfTI affine uses the mean); beyond, refused
CLOCK_SKEW_S = 300.0  # a PET scan that starts up to this long before the recorded injection: at injection
ORIGINAL_PIXEL_ELEMENTS = (  # what describes the original pixels only: dropped from a derived instance
    "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "IconImageSequence", "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "DataSetTrailingPadding")


def supported_transfer_syntaxes() -> list[uids.UID]:
    """The transfer syntaxes pydicom decodes here (with the installed plugins)."""
    supported = []
    for syntax in uids.AllTransferSyntaxes:
        try:
            if get_decoder(syntax).is_available:
                supported.append(syntax)
        except NotImplementedError:  # pydicom has no decoder for it at all
            continue
    return supported


@dataclass
class Slice:
    """One image plane: a single-frame instance, or one frame of a multi-frame instance."""

    path: Path
    header: Dataset  # the instance's header (no pixels), shared by its frames
    frame: int | None  # 0-based frame of a multi-frame instance
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient (row direction, column direction)
    spacing: np.ndarray  # PixelSpacing (between rows, between columns), mm
    slope: float
    intercept: float
    to_suv: float = 1.0  # physical = (stored * slope + intercept) * to_suv (PET: Bq/ml to SUV; else 1)

    @property
    def where(self) -> str:
        return _where(self.path, self.frame)


def _where(path: Path, frame: int | None) -> str:
    return f"{path}" + (f" frame {frame + 1}" if frame is not None else "")


def _item(header: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """A functional group of a multi-frame frame (per-frame first, then shared); for a
    single-frame instance, the instance itself."""
    if frame is None:
        return header
    for groups in (header.get("PerFrameFunctionalGroupsSequence", [])[frame:frame + 1],
                   header.get("SharedFunctionalGroupsSequence", [])):
        for group in groups:
            if sequence in group and len(group[sequence].value):
                return group[sequence].value[0]
    return None


def _number(item: Dataset | None, keyword: str, default: float | None, where: str) -> float:
    """A numeric attribute as a finite float: `default` where it is absent or empty (None: required)."""
    value = item.get(keyword) if item is not None else None
    if value is None or value == "":
        if default is None:
            raise VolumeError(f"{where} has no {keyword}")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"{where} has an invalid {keyword} ({value!r})") from None
    if not math.isfinite(number):
        raise VolumeError(f"{where} has an invalid {keyword} ({value!r})")
    return number


def _first(header: Dataset, sequence: str) -> Dataset | None:
    """The first item of a sequence, or None where it is absent or empty (type 2)."""
    items = header.get(sequence) or []
    return items[0] if len(items) else None


def _numbers(item: Dataset | None, keyword: str, count: int, where: str) -> np.ndarray:
    value = item.get(keyword) if item is not None else None
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise VolumeError(f"{where} has no valid {keyword}; the slices cannot be placed")
    return numbers


def _slices(path: Path, header: Dataset) -> list[Slice]:
    """The image planes of one instance, with their geometry and rescale."""
    frames = [None]
    if "PerFrameFunctionalGroupsSequence" in header:
        count = _number(header, "NumberOfFrames", None, str(path))
        if not 1 <= count == len(header.PerFrameFunctionalGroupsSequence):
            raise VolumeError(f"{path} has {count:g} frames but {len(header.PerFrameFunctionalGroupsSequence)} "
                              "per-frame functional groups")
        count = int(count)
        frames = range(count)
    slices = []
    for frame in frames:
        where = _where(path, frame)
        position = _numbers(_item(header, frame, "PlanePositionSequence"), "ImagePositionPatient", 3, where)
        orientation = _numbers(_item(header, frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6, where)
        spacing = _numbers(_item(header, frame, "PixelMeasuresSequence"), "PixelSpacing", 2, where)
        rescale = _item(header, frame, "PixelValueTransformationSequence")
        slope, intercept = _number(rescale, "RescaleSlope", 1.0, where), _number(rescale, "RescaleIntercept", 0.0, where)
        if slope == 0:
            raise VolumeError(f"{where} has an invalid rescale (slope {slope:g}, intercept {intercept:g})")
        if np.any(spacing <= 0):
            raise VolumeError(f"{where} has a PixelSpacing of {spacing.tolist()} mm")
        slices.append(Slice(path, header, frame, position, orientation, spacing, slope, intercept))
    return slices


def _files(inputs: Sequence[Path]) -> list[Path]:
    files = []
    for source in inputs:
        if not source.exists():
            raise VolumeError(f"input not found: {source}")
        files += sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    if not files:
        raise VolumeError(f"no files in {', '.join(map(str, inputs))}")
    return files


def _headers(files: list[Path]) -> tuple[list[tuple[Path, Dataset]], Counter]:
    """(image instances, what else was there). Files that are not DICOM are counted, not refused;
    a DICOM file that cannot be read is refused."""
    images, others = [], Counter()
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            others[_not_dicom(path)] += 1
            continue
        except Exception as exc:  # pydicom raises many types on damaged files
            raise VolumeError(f"cannot read {path} as DICOM: {first_line(exc)}") from exc
        meta = header.get("file_meta") or Dataset()
        sop_class = header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")  # DICOMDIR: meta only
        if sop_class in IMAGE_STORAGE:
            header.SOPClassUID = sop_class
            if "SOPInstanceUID" not in header and meta.get("MediaStorageSOPInstanceUID"):
                header.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            images.append((path, header))
        else:
            others[uids.UID(sop_class).name if sop_class else "objects without a SOP class"] += 1
    return images, others


def _not_dicom(path: Path) -> str:
    """What a file that pydicom does not read as DICOM (no 'DICM' after its preamble) is."""
    if is_nifti_path(path):
        return "NIfTI files (give a NIfTI file on its own)"
    with open(path, "rb") as f:
        start = f.read(8)
    group = start[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")  # the file meta or group 0008 at offset 0
    explicit_vr, implicit_length = start[4:6].isalpha() and start[4:6].isupper(), start[4:8][2:] == b"\x00\x00"
    if len(start) == 8 and group and (explicit_vr or implicit_length):
        return "DICOM data sets without the DICOM file preamble (not read: rewrite them as DICOM files, e.g. with dcmconv)"
    return "files that are neither DICOM nor NIfTI"


def _choose_series(images: list[tuple[Path, Dataset]], others: Counter, series: str | None, inputs,
                   notes: list[str]) -> list:
    where = ", ".join(map(str, inputs))
    if not images:
        found = "; ".join(f"{n} {what}" for what, n in others.items())
        raise VolumeError(f"no CT, MR or PET image in {where} (found {found})")
    by_series: dict[str, list] = {}
    for path, header in images:
        by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    if series is None and len(by_series) > 1:
        listing = "; ".join(f"{uid} {str(items[0][1].get('SeriesDescription', '')).strip()!r} "
                            f"({items[0][1].get('Modality', '?')}, {len(items)} files)" for uid, items in by_series.items())
        raise VolumeError(f"{where} holds {len(by_series)} image series; choose one with --series UID: {listing}")
    if series is not None and series not in by_series:
        raise VolumeError(f"no image series {series} in {where}; it holds {', '.join(by_series)}")
    chosen = by_series[series if series is not None else next(iter(by_series))]
    if others or len(by_series) > 1:
        skipped = [f"{n} {what}" for what, n in others.items()]
        skipped += [f"{len(items)} files of series {uid}" for uid, items in by_series.items() if items is not chosen]
        notes.append(f"ignored {', '.join(skipped)} in {where}")
    return chosen


def _check_decodable(path: Path, header: Dataset) -> None:
    syntax = header.file_meta.get("TransferSyntaxUID", None) if hasattr(header, "file_meta") else None
    if syntax is None:
        raise VolumeError(f"{path} has no transfer syntax in its file meta information")
    syntax = uids.UID(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        names = ", ".join(s.name for s in supported_transfer_syntaxes())
        raise VolumeError(f"{path} is encoded as {syntax.name} ({syntax}), which medir-fast cannot decode here; "
                          f"supported: {names}")


def _check_pixels(path: Path, header: Dataset) -> None:
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if not 1 <= _number(header, keyword, None, str(path)) <= 65535:
            raise VolumeError(f"{path} has an invalid {keyword} ({header.get(keyword)})")
    samples, photometric = int(header.get("SamplesPerPixel", 1)), str(header.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(f"{path} is a {photometric or 'colour'} image with {samples} samples per pixel; "
                          "medir-fast restores greyscale images")
    if int(header.get("BitsAllocated", 16)) not in (8, 16, 32):
        raise VolumeError(f"{path} stores {header.get('BitsAllocated')}-bit pixels; medir-fast reads 8-, 16- and "
                          "32-bit integer pixel data")


def _grid(slices: list[Slice], notes: list[str]) -> tuple[list[Slice], np.ndarray]:
    """The slices in order along the normal, and the voxel -> RAS affine; refuses what is not
    one regular grid."""
    first = slices[0]
    sizes = {(int(s.header.Rows), int(s.header.Columns)) for s in slices}
    if len(sizes) > 1:
        raise VolumeError(f"the series mixes image sizes {' and '.join(f'{r}x{c}' for r, c in sorted(sizes))}; "
                          "restore one size at a time (--series, or a folder per size)")
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise VolumeError(f"the series mixes orientations: {s.where} has ImageOrientationPatient "
                              f"{s.orientation.round(4).tolist()}, {first.where} {first.orientation.round(4).tolist()}")
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4):
            raise VolumeError(f"the series mixes pixel spacings: {s.where} has {s.spacing.tolist()} mm, "
                              f"{first.where} {first.spacing.tolist()} mm")
    frames_of_reference = {str(s.header.get("FrameOfReferenceUID", "")) for s in slices}
    if len(frames_of_reference) > 1:
        raise VolumeError(f"the series has {len(frames_of_reference)} frames of reference "
                          f"({', '.join(sorted(frames_of_reference))}); its slices share no geometry")
    row, column = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, column)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(column) - 1) < 1e-3 and abs(row @ column) < 1e-3):
        raise VolumeError(f"{first.where} has ImageOrientationPatient {first.orientation.tolist()}, not two "
                          "orthogonal unit vectors")
    distance = np.array([s.position @ normal for s in slices])
    order = np.argsort(distance, kind="stable")
    slices, distance = [slices[i] for i in order], distance[order]
    gaps = np.diff(distance)
    for k in np.flatnonzero(gaps < POSITION_TOLERANCE_MM):
        raise VolumeError(f"{slices[k].where} and {slices[k + 1].where} are at the same position ({distance[k]:.3f} mm "
                          "along the slice normal): several acquisitions, echoes or phases in one series?")
    offsets = np.array([s.position - d * normal for s, d in zip(slices, distance)])
    shear = np.linalg.norm(offsets - offsets[0], axis=1)
    if shear.max() > SHEAR_TOLERANCE_MM:
        k = int(np.argmax(shear))
        angle = math.degrees(math.atan2(shear[k], distance[k] - distance[0]))
        raise VolumeError(f"the slices are sheared by {angle:.1f} degrees (a tilted gantry?): {slices[k].where} is "
                          f"{shear[k]:.2f} mm off the normal through {slices[0].where}; resample it to an orthogonal grid")
    if len(slices) > 1:
        step = (distance[-1] - distance[0]) / (len(slices) - 1)
        jitter = float(np.max(np.abs(gaps - step)) / step)
        if jitter > SPACING_JITTER_WARNED:
            k = int(np.argmax(np.abs(gaps - step)))
            raise VolumeError(f"uneven slice spacing: {gaps.min():.3f} to {gaps.max():.3f} mm (mean {step:.3f}); "
                              f"{gaps[k]:.3f} mm between {slices[k].where} and {slices[k + 1].where} (a missing slice?)")
        if jitter > SPACING_JITTER_SILENT:
            notes.append(f"slice spacing varies by up to {100 * jitter:.2f}% of its mean {step:.4f} mm; the NIfTI "
                         "geometry uses the mean")
    else:
        measures = _item(first.header, first.frame, "PixelMeasuresSequence")  # one plane: its thickness, if given
        step = abs(_number(measures, "SpacingBetweenSlices", 0.0, first.where)) or abs(
            _number(measures, "SliceThickness", 0.0, first.where)) or 1.0
    lps = np.eye(4)
    lps[:3, 0] = row * first.spacing[1]  # voxel axis 0 runs along a row: the spacing between columns
    lps[:3, 1] = column * first.spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = slices[0].position
    return slices, LPS_TO_RAS @ lps


def _datetime(date, time) -> datetime.datetime | None:
    """DA + TM (or the DA and TM halves of a DT) as a datetime; None where either is missing or invalid."""
    try:
        return datetime.datetime.combine(DA(date), TM(time)) if date and time else None
    except (TypeError, ValueError):
        return None


def _suv_factors(slices: list[Slice]) -> str | None:
    """Set each PET slice's factor from Bq/ml to SUV body weight; None, or what is missing or
    implausible (then nothing is set)."""
    header = slices[0].header
    units = str(header.get("Units", "")).upper()
    if units == "GML":
        return None  # already SUV body weight
    if units != "BQML":
        return f"Units {units or '(missing)'} (SUV needs BQML)"
    drug = _first(header, "RadiopharmaceuticalInformationSequence")
    values = {}
    for item, keyword in ((header, "PatientWeight"), (drug, "RadionuclideTotalDose"), (drug, "RadionuclideHalfLife")):
        try:
            values[keyword] = _number(item, keyword, 0.0, "")
        except VolumeError:
            values[keyword] = 0.0
    missing = [keyword for keyword, value in values.items() if not value > 0]
    if missing:
        return ", ".join(missing)
    weight, dose, half_life = values.values()
    start = str(drug.get("RadiopharmaceuticalStartDateTime", "") or "")
    day = header.get("SeriesDate")
    # a DT is a date and time; a TM alone is on the series' day (a scan after midnight: the day before)
    injected = _datetime(start[:8], start[8:].split("+")[0].split("-")[0]) if start else _datetime(
        day, drug.get("RadiopharmaceuticalStartTime"))
    decay = str(header.get("DecayCorrection", "")).upper()
    if decay not in ("START", "ADMIN", "NONE"):
        return f"DecayCorrection {decay or '(missing)'} (SUV needs START, ADMIN or NONE)"
    factors = []
    for s in slices:
        elapsed = 0.0
        if decay != "ADMIN":
            if decay == "START":
                reference = _datetime(day, header.get("SeriesTime"))
            else:  # NONE: each slice decayed to its own acquisition
                content = _item(s.header, s.frame, "FrameContentSequence") if s.frame is not None else None
                stamp = str(content.get("FrameAcquisitionDateTime", "") or "") if content is not None else ""
                reference = (_datetime(stamp[:8], stamp[8:].split("+")[0].split("-")[0]) if stamp
                             else _datetime(s.header.get("AcquisitionDate") or day, s.header.get("AcquisitionTime")))
            if injected is None or reference is None:
                return "the injection time, or the series' or acquisition's date and time"
            elapsed = (reference - injected).total_seconds()
            if -CLOCK_SKEW_S <= elapsed < 0:
                elapsed = 0.0  # the injection and the scanner clocks disagree by a little
            elif elapsed < 0 and not start:
                elapsed += 86400.0  # injected before midnight, scanned after
            if not 0 <= elapsed <= 10 * half_life:
                return (f"a plausible time from injection to scan (it reads {elapsed / 3600:.2f} h, half-life "
                        f"{half_life / 3600:.2f} h)")
        factors.append(weight * 1000.0 / (dose * 2.0 ** (-elapsed / half_life)))
    for s, factor in zip(slices, factors):
        s.to_suv = factor
    return None


class DicomVolume(Volume):
    """A DICOM series on disk as a `Volume`: slices ordered along the normal, pixels decoded
    when a slab is read (along any other axis than the slices', once for the whole series)."""

    def __init__(self, path: Path, slices: list[Slice], affine: np.ndarray, unit: str, notes: list[str]):
        self.path, self.slices, self._affine, self.unit = path, slices, affine, unit
        self.notes = notes  # what the caller says once the input is accepted (ignored files, spacing jitter)
        self.modality = IMAGE_STORAGE[slices[0].header.SOPClassUID]
        self._whole: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        header = self.slices[0].header
        return int(header.Columns), int(header.Rows), len(self.slices)

    @property
    def affine(self) -> np.ndarray:
        return self._affine

    @property
    def header(self) -> nib.Nifti1Header:
        """A NIfTI header for this geometry (DICOM in, NIfTI out): scanner coordinates, mm."""
        header = nib.Nifti1Header()
        header.set_data_shape(self.shape)
        header.set_qform(self.affine, code=1)
        header.set_sform(self.affine, code=1)
        header.set_xyzt_units("mm", "sec")
        header["descrip"] = f"{self.modality} {self.unit}".encode()[:79]
        return header

    def slice_axis(self) -> int:
        return 2  # the acquired planes, whatever their orientation

    def check_derivable(self) -> None:
        """Refuse, before any computation, a series that a derived series could not reference."""
        for s in self.slices:
            if not s.header.get("SOPInstanceUID"):
                raise VolumeError(f"{s.path} has no SOPInstanceUID; a derived series could not reference it "
                                  "(write NIfTI instead)")

    def slab(self, axis: int, start: int, stop: int) -> np.ndarray:
        if axis == 2:
            return self._planes(self.slices[start:stop])
        if self._whole is None:
            self._whole = np.moveaxis(self._planes(self.slices), 0, 2)
        index = [slice(None)] * 3
        index[axis] = slice(start, stop)
        return np.moveaxis(self._whole[tuple(index)], axis, 0)

    def _planes(self, slices: list[Slice]) -> np.ndarray:
        """The slices in physical units as float32 [n, columns, rows]. A multi-frame instance is
        parsed once for all the frames asked of it."""
        stored: dict[tuple[Path, int | None], np.ndarray] = {}
        frames: dict[Path, list[int]] = {}
        for s in slices:
            if s.frame is None:
                stored[s.path, None] = self._decode(s.path, None)
            else:
                frames.setdefault(s.path, []).append(s.frame)
        for path, indices in frames.items():
            wanted = sorted(set(indices))
            stored |= {(path, i): pixels for i, pixels in zip(wanted, self._decode(path, wanted))}
        planes = np.empty((len(slices), *self.shape[:2]), np.float32)
        for k, s in enumerate(slices):
            pixels = stored[s.path, s.frame]
            if pixels.dtype.kind not in "ui":
                raise VolumeError(f"{s.where} holds {pixels.dtype} pixels; medir-fast reads integer pixel data")
            if pixels.shape != (self.shape[1], self.shape[0]):
                raise VolumeError(f"{s.where} decodes to {pixels.shape}, not its {self.shape[1]}x{self.shape[0]} pixels")
            planes[k] = ((pixels.astype(np.float64) * s.slope + s.intercept) * s.to_suv).T
        return planes

    @staticmethod
    def _decode(path: Path, frames: list[int] | None):
        """The stored pixels of a single-frame instance, or of the given frames of a multi-frame one."""
        try:
            if frames is None:
                return pydicom.pixels.pixel_array(path)
            return list(pydicom.pixels.iter_pixels(path, indices=frames))
        except Exception as exc:  # the decoders raise many types on damaged data
            raise VolumeError(f"cannot decode the pixels of {path}: {first_line(exc)}") from exc


def read_series(inputs: Sequence[str | Path], task: Task, series: str | None = None, force_task: bool = False,
                range_given: bool = False) -> DicomVolume:
    """The one image series under `inputs` (folders searched recursively, or files), checked.

    The series' Modality must be the task's (CT for ct_denoise, MR for mri_sr, PT for
    pet_synthesis) unless `force_task`. PET is converted to SUV; where the tags it needs are
    missing the series is refused, unless `range_given` (then its values stay as stored, in the
    range the user gave). MR intensities are scanner units: without `range_given` a note says
    that the task's range is a guess. Notes (also: files ignored, spacing jitter) are kept in
    `DicomVolume.notes` for the caller to show once the whole input is accepted.
    """
    inputs = [Path(p) for p in inputs]
    notes: list[str] = []
    images, others = _headers(_files(inputs))
    chosen = _choose_series(images, others, series, inputs, notes)
    ignored = list(notes)  # what was set aside may be what the user meant: said with any refusal
    try:
        modality = IMAGE_STORAGE[chosen[0][1].SOPClassUID]
        if task.dicom_modality != modality and not force_task:
            raise VolumeError(f"the series is {modality} but {task.name} restores {task.dicom_modality}; "
                              "pass --force-task to run it anyway")
        slices = []
        for path, header in chosen:
            _check_decodable(path, header)
            _check_pixels(path, header)
            slices += _slices(path, header)
        if not slices:
            raise VolumeError(f"the series in {', '.join(map(str, inputs))} holds no image planes")
        slices, affine = _grid(slices, notes)
        unit = {"CT": "HU", "MR": "as stored"}.get(modality, "SUV")
        if modality == "PT":
            missing = _suv_factors(slices)
            if missing is not None:
                if not range_given:
                    raise VolumeError(f"cannot compute SUV for this PET series: missing {missing}; give --range LO HI in "
                                      f"its stored units ({slices[0].header.get('Units', 'unknown')}) to restore it as stored")
                unit = str(slices[0].header.get("Units", "as stored"))
        if modality == "MR" and not range_given:
            notes.append(f"MR intensities are in scanner units: the range [{task.lo:g}, {task.hi:g}] of {task.name} is a "
                         "guess; give --range LO HI to set it")
    except VolumeError as exc:
        raise VolumeError("; ".join([str(exc), *ignored])) from exc
    return DicomVolume(inputs[0] if len(inputs) == 1 else inputs[0].parent, slices, affine, unit, notes)


# ---------------------------------------------------------------------------------- writing


def _storage(header: Dataset) -> tuple[np.dtype, int, int]:
    """(numpy type of the stored pixels, smallest and largest value BitsStored holds)."""
    bits, signed = int(header.get("BitsStored", header.BitsAllocated)), int(header.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{int(header.BitsAllocated) // 8}")
    return (dtype, -(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (dtype, 0, (1 << bits) - 1)


def _refined(s: Slice, refine: int) -> tuple[np.ndarray, np.ndarray]:
    """(position, spacing) of slice `s` on the grid refined `refine` times in-plane (the same
    voxel centres as `nifti.resampled_affine`)."""
    row, column = s.orientation[:3], s.orientation[3:]
    shift = (0.5 / refine - 0.5) * (row * s.spacing[1] + column * s.spacing[0])
    return s.position + shift, s.spacing / refine


def _ds(value: float) -> DS:
    return DS(value, auto_format=True)


def _values(value) -> list[str]:
    """A multi-valued attribute as a list (pydicom gives a one-valued one as a plain string)."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _set_rescale(ds: Dataset, header: Dataset, frame: int | None, slope: float, intercept: float) -> None:
    """A rescale of its own for instance `ds` (or one frame: moved out of the shared groups),
    keeping the original `header`'s rescale type. A real world value mapping of the original
    stored values no longer holds: it is dropped."""
    for item in (ds, *ds.get("SharedFunctionalGroupsSequence", []), *ds.get("PerFrameFunctionalGroupsSequence", [])):
        if "RealWorldValueMappingSequence" in item:
            del item.RealWorldValueMappingSequence
    if frame is None:
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        return
    previous = _item(header, frame, "PixelValueTransformationSequence")
    rescale_type = previous.get("RescaleType", "US") if previous is not None else "US"
    for group in ds.get("SharedFunctionalGroupsSequence", []):
        if "PixelValueTransformationSequence" in group:
            del group.PixelValueTransformationSequence
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = _ds(slope), _ds(intercept), rescale_type
    ds.PerFrameFunctionalGroupsSequence[frame].PixelValueTransformationSequence = [rescale]


def _derive(header: Dataset, series_uid: str, description: str, derivation: str, now: datetime.datetime) -> Dataset:
    """A copy of `header` as an instance of the new derived series, to be written as Explicit VR
    Little Endian whatever the input's encoding."""
    ds = copy.deepcopy(header)
    for _ in ds.iterall():  # every element decoded from the input's encoding, so that it can be re-encoded
        pass
    ds.set_original_encoding(False, True)
    for keyword in ORIGINAL_PIXEL_ELEMENTS:
        if keyword in ds:
            delattr(ds, keyword)
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    source.PurposeOfReferenceCodeSequence = [purpose]
    ds.SourceImageSequence = [source]
    ds.SOPInstanceUID = uids.generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(header.get("SeriesNumber", 0) or 0) + 1000
    ds.SeriesDescription = description
    # enhanced (multi-frame) images keep value 2 PRIMARY, as their IODs require; their frames become DERIVED
    enhanced = "PerFrameFunctionalGroupsSequence" in header
    ds.ImageType = ["DERIVED", "PRIMARY" if enhanced else "SECONDARY", *_values(header.get("ImageType"))[2:]]
    ds.DerivationDescription = derivation
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = header.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    for groups in (ds.get("SharedFunctionalGroupsSequence", []), ds.get("PerFrameFunctionalGroupsSequence", [])):
        for group in groups:
            for element in group:
                if element.keyword.endswith("FrameTypeSequence") and element.value:
                    frame_type = _values(element.value[0].get("FrameType"))
                    element.value[0].FrameType = ["DERIVED", *frame_type[1:]]
    return ds


def _stored(physical: np.ndarray, s: Slice, header: Dataset, per_instance_slope: bool) -> tuple[np.ndarray, float, float, int]:
    """(stored pixels [rows, columns], slope, intercept, clipped count) for one restored plane."""
    dtype, lowest, highest = _storage(header)
    values = physical.astype(np.float64) / s.to_suv
    slope, intercept = s.slope, s.intercept
    if per_instance_slope:  # PET: the largest value takes the whole stored range
        largest = float(np.max(np.abs(values - intercept))) if values.size else 0.0
        slope = float(_ds(largest / highest)) if largest > 0 else 1.0
    exact = np.rint((values - intercept) / slope)
    clipped = int(np.count_nonzero((exact < lowest) | (exact > highest)))
    return np.clip(exact, lowest, highest).astype(dtype).T, slope, intercept, clipped


def write_series(folder: Path, restored: np.ndarray, volume: DicomVolume, description: str, derivation: str,
                 scale: int | None = None) -> None:
    """Write `restored` (physical units, NIfTI axes [columns, rows, slices]) into `folder` (a new
    empty folder that the caller commits) as a derived series of `volume`, then read it back."""
    nonfinite = int(restored.size - np.count_nonzero(np.isfinite(restored)))
    if nonfinite:
        raise VolumeError(f"{nonfinite} of {restored.size} output voxels are NaN or infinite; nothing was written")
    series_uid = uids.generate_uid()
    now = datetime.datetime.now()
    refine = scale or 1
    per_instance_slope = volume.modality == "PT"
    by_instance: dict[Path, list[tuple[int, Slice]]] = {}
    for k, s in enumerate(volume.slices):
        by_instance.setdefault(s.path, []).append((k, s))
    clipped = 0
    written = []
    for number, (path, planes) in enumerate(sorted(by_instance.items(), key=lambda item: item[1][0][0]), start=1):
        header = planes[0][1].header
        ds = _derive(header, series_uid, description, derivation, now)
        ds.InstanceNumber = number
        frames = []
        for k, s in sorted(planes, key=lambda item: item[1].frame or 0):
            stored, slope, intercept, lost = _stored(restored[:, :, k], s, header, per_instance_slope)
            clipped += lost
            frames.append(stored)
            if refine != 1:  # the refined grid; otherwise the geometry tags are carried as they are
                position, spacing = _refined(s, refine)
                _item(ds, s.frame, "PlanePositionSequence").ImagePositionPatient = [_ds(v) for v in position]
                _item(ds, s.frame, "PixelMeasuresSequence").PixelSpacing = [_ds(v) for v in spacing]
            if per_instance_slope:
                _set_rescale(ds, header, s.frame, slope, intercept)
        ds.Rows, ds.Columns = frames[0].shape
        pixels = np.stack(frames) if "PerFrameFunctionalGroupsSequence" in ds else frames[0]
        data = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).tobytes()
        ds.add_new(0x7FE00010, "OB" if pixels.dtype.itemsize == 1 else "OW", data)  # PixelData
        target = folder / f"IM{number:05d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append((target, pixels))
    if clipped:
        log.warning("%d output voxels fell outside what the input's stored type holds and were clipped", clipped)
    for target, pixels in written:
        back = pydicom.dcmread(target)
        if back.SeriesInstanceUID != series_uid or not np.array_equal(back.pixel_array.reshape(pixels.shape), pixels):
            raise RuntimeError(f"{target.name} does not read back as written (a bug); nothing was written")
