"""DICOM series made from a volume and its RAS affine, as a scanner would export them: one file
per slice under random names, LPS geometry, stored integers with a rescale (PET: a slope per
slice and the dose module SUV needs). Written with pydicom, independently of medir_fast.io."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, PositronEmissionTomographyImageStorage,
                         generate_uid)

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, written out here on purpose (not imported)
SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage, "PT": PositronEmissionTomographyImageStorage}
PET_WEIGHT_KG, PET_DOSE_BQ, PET_HALF_LIFE_S = 72.5, 3.7e8, 6586.2  # F-18
PET_INJECTED, PET_SERIES = datetime.datetime(2026, 5, 4, 9, 58, 30), datetime.datetime(2026, 5, 4, 11, 0, 0)


def suv_factor(injected=PET_INJECTED, scanned=PET_SERIES) -> float:
    """Bq/ml -> SUV body weight for the PET series written here (decay to the series start)."""
    elapsed = (scanned - injected).total_seconds()
    return PET_WEIGHT_KG * 1000.0 / (PET_DOSE_BQ * 0.5 ** (elapsed / PET_HALF_LIFE_S))


def _ds(value: float) -> str:
    return f"{value:.10g}"[:16]


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, modality: str = "CT", seed: int = 0,
                 description: str = "test series", series_uid: str | None = None, study_uid: str | None = None,
                 edit=None) -> list[Path]:
    """One file per slice data[:, :, k] (physical units: HU, MR units, SUV) under `folder`.
    edit(k, dataset) may change a slice's header before it is written (to make a bad series)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lps = FLIP @ affine
    row, column = lps[:3, 0], lps[:3, 1]
    series_uid, study_uid, frame_uid = series_uid or generate_uid(), study_uid or generate_uid(), generate_uid()
    paths = []
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "MF0001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260504", "095000", "1", "A1"
        ds.SeriesDate, ds.SeriesTime = PET_SERIES.strftime("%Y%m%d"), PET_SERIES.strftime("%H%M%S")
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 3, k + 1, description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3] @ np.array([0.0, 0.0, k, 1.0])]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row / np.linalg.norm(row), *column / np.linalg.norm(column))]
        ds.PixelSpacing = [_ds(np.linalg.norm(column)), _ds(np.linalg.norm(row))]
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        plane = data[:, :, k].T.astype(np.float64)  # [rows, columns]
        if modality == "CT":  # unsigned with the usual intercept
            ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0, "1", "-1024", "HU"
            stored = np.rint(plane + 1024).astype(np.uint16)
        elif modality == "MR":
            ds.PixelRepresentation = 0
            stored = np.rint(plane).astype(np.uint16)
        else:  # PET: Bq/ml in int16 with this slice's own slope
            ds.PixelRepresentation = 1
            activity = plane / suv_factor()
            slope = float(_ds(max(float(np.abs(activity).max()), 1e-6) / 32767))
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), "0"
            stored = np.rint(activity / slope).astype(np.int16)
            ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["DECY", "ATTN"]
            ds.PatientWeight = _ds(PET_WEIGHT_KG)
            drug = Dataset()
            drug.RadionuclideTotalDose, drug.RadionuclideHalfLife = _ds(PET_DOSE_BQ), _ds(PET_HALF_LIFE_S)
            drug.RadiopharmaceuticalStartDateTime = PET_INJECTED.strftime("%Y%m%d%H%M%S")
            ds.RadiopharmaceuticalInformationSequence = [drug]
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        if edit is not None:
            edit(k, ds)
        path = folder / f"{rng.integers(1 << 40):011x}"  # names say nothing about order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stored_physical(paths) -> np.ndarray:
    """The values a series holds, as a reader following the standard computes them (pydicom's
    modality LUT), stacked in InstanceNumber order as [columns, rows, slices]."""
    from pydicom.pixels import apply_rescale

    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))
    return np.stack([apply_rescale(d.pixel_array, d).astype(np.float64).T for d in datasets], axis=2)
