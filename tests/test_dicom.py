"""DICOM in and out: series generated from NIfTI volumes (tests/dicom_series.py) and pydicom's
own test files; the round trip against the NIfTI path; every refusal in one line, nothing written."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medir_fast.api import restore_file
from medir_fast.export.metadata import weights_sha256
from medir_fast.io import VolumeError, read_input, resampled_affine
from medir_fast.io.dicom import LPS_TO_RAS, read_series, supported_transfer_syntaxes
from medir_fast.io.dicom import write_series as write_series_from_volume
from medir_fast.tasks import get_task

from .conftest import write_nifti
from .dicom_series import FLIP, PET_DOSE_BQ, PET_HALF_LIFE_S, PET_WEIGHT_KG, stored_physical, suv_factor, write_series
from .test_cli import assert_one_line_error, run_cli

SHAPE = (37, 61, 5)


def _affine(kind: str) -> np.ndarray:
    """RAS affines: axial as write_nifti makes them; oblique (30 degrees about S) with the slices
    running from head to feet, so that DICOM's order along the normal is the reverse of NIfTI's."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 20.0, -30.0]
    if kind == "oblique, slices head to feet":
        c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.7, -2.5])
    return affine


def _volume(modality: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if modality == "CT":
        return rng.normal(40, 300, size=SHAPE).clip(-1024, 3000).round()
    if modality == "MR":
        return rng.uniform(0, 3000, size=SHAPE).round()
    return rng.gamma(2.0, 2.0, size=SHAPE).clip(0, 25)


@pytest.fixture
def ct_pair(tmp_path):
    """(NIfTI file, DICOM folder) holding the same CT volume, integer HU, axial."""
    hu = _volume("CT")
    nifti = write_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine=_affine("axial"))
    write_series(tmp_path / "series", hu, _affine("axial"), "CT")
    return nifti, tmp_path / "series"


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(path))
    return image.affine, np.asarray(image.dataobj)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------- geometry


def test_lps_and_ras_are_one_flip_both_ways(tmp_path):
    """DICOM -> RAS on a slice whose numbers are worked out by hand; RAS -> DICOM -> RAS on the
    generated series below (the generator flips with its own copy of the matrix)."""
    assert np.array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4)) and np.array_equal(LPS_TO_RAS, FLIP)

    def hand_made(k, ds):
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [10, 20, 30], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.25], 3  # between rows, between columns
    write_series(tmp_path / "s", _volume("CT")[:, :, :1], _affine("axial"), "CT", edit=hand_made)
    affine = read_series([tmp_path / "s"], get_task("ct_denoise")).affine
    # voxel axis 0 runs along a row (+x = patient left = RAS -x), axis 1 down the columns (+y = posterior)
    np.testing.assert_allclose(affine, [[-0.25, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_geometry_matches_nibabels_dicom_wrapper(name):
    """nibabel's wrapper (rows first) and medir-fast (columns first, as NIfTI) place a slice alike."""
    from nibabel.nicom.dicomwrappers import wrapper_from_file

    path = get_testdata_file(name)
    ours = LPS_TO_RAS @ read_series([path], get_task("CT" if name.startswith("CT") else "mri_sr"), range_given=True).affine
    theirs = wrapper_from_file(path).affine
    np.testing.assert_allclose(ours[:3, [1, 0, 3]], theirs[:3, [0, 1, 3]], atol=1e-5)


@pytest.mark.parametrize("kind", ["axial", "oblique, slices head to feet"])
def test_generated_series_reads_back_with_the_niftis_geometry_and_values(tmp_path, kind):
    hu = _volume("CT")
    write_series(tmp_path / "s", hu, _affine(kind), "CT")
    volume = read_series([tmp_path / "s"], get_task("ct_denoise"))
    nifti = write_nifti(tmp_path / "ref.nii", hu.astype(np.int16), affine=_affine(kind))
    write_nifti(tmp_path / "got.nii", volume.read().astype(np.int16), affine=volume.affine)
    (ref_affine, ref), (got_affine, got) = _canonical(nifti), _canonical(tmp_path / "got.nii")
    np.testing.assert_allclose(got_affine, ref_affine, atol=1e-4)
    assert np.array_equal(got, ref)


def test_round_trip_nifti_to_dicom_to_nifti_equals_the_nifti_path(tmp_path, ct_pair, tiny_model):
    nifti, series = ct_pair
    restore_file(nifti, tmp_path / "a.nii.gz", "ct_denoise", model=tiny_model)
    restore_file(series, tmp_path / "b.nii.gz", "ct_denoise", model=tiny_model, out_dtype="float32")
    a, b = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), atol=1e-3)
    assert b.header["sform_code"] == 1 and b.header.get_xyzt_units() == ("mm", "sec")


def test_dicom_out_is_a_derived_series_of_the_input(tmp_path, ct_pair, tiny_model):
    nifti, series = ct_pair
    restore_file(nifti, tmp_path / "a.nii.gz", "ct_denoise", model=tiny_model)
    out = restore_file(series, tmp_path / "out", "ct_denoise", model=tiny_model)
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p) for p in series.iterdir())}
    written = sorted(out.iterdir())
    assert len(written) == SHAPE[2]
    derived = [pydicom.dcmread(p) for p in written]
    assert len({d.SeriesInstanceUID for d in derived}) == 1
    assert derived[0].SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}
    assert len({d.SOPInstanceUID for d in derived}) == SHAPE[2] and not {d.SOPInstanceUID for d in derived} & set(sources)
    for d in derived:
        source = sources[d.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert d.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert d.SeriesDescription == "test series (medir-fast ct_denoise)"
        assert weights_sha256(tiny_model) in d.DerivationDescription and "ct_denoise" in d.DerivationDescription
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "FrameOfReferenceUID", "ImagePositionPatient",
                        "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept", "BitsStored",
                        "PixelRepresentation", "Modality", "SOPClassUID"):
            assert d.get(keyword) == source.get(keyword), keyword
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    # values: the NIfTI path's, stored as uint16 with intercept -1024 (rounded, clipped to the type)
    expected = np.clip(np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj), -1024, 65535 - 1024)
    assert np.max(np.abs(stored_physical(written) - expected)) <= 0.5 + 1e-3


def test_pet_is_restored_in_suv_and_written_back_in_bq_per_ml(tmp_path, tiny_model):
    suv = _volume("PT")
    write_series(tmp_path / "pet", suv, _affine("axial"), "PT")
    volume = read_series([tmp_path / "pet"], get_task("pet_synthesis"))
    step = suv.max() / 32767  # the generator's slope, in SUV, at most
    assert volume.unit == "SUV" and np.max(np.abs(volume.read() - suv)) <= step
    restored = restore_file(tmp_path / "pet", tmp_path / "r.nii.gz", "pet_synthesis", model=tiny_model)
    out = restore_file(tmp_path / "pet", tmp_path / "out", "pet_synthesis", model=tiny_model)
    expected = np.asarray(nib.load(restored).dataobj)
    written = sorted(out.iterdir())
    slopes = {float(pydicom.dcmread(p).RescaleSlope) for p in written}
    assert len(slopes) == SHAPE[2]  # one per instance
    back = stored_physical(written) * suv_factor()  # Bq/ml -> SUV, as a PET viewer does
    assert np.max(np.abs(back - expected)) <= max(slopes) * suv_factor() * (0.5 + 1e-6) + 1e-6


def test_pet_decay_correction_to_the_injection_needs_no_decay(tmp_path):
    write_series(tmp_path / "pet", _volume("PT"), _affine("axial"), "PT",
                 edit=lambda k, ds: setattr(ds, "DecayCorrection", "ADMIN"))
    volume = read_series([tmp_path / "pet"], get_task("pet_synthesis"))
    assert volume.slices[0].to_suv == pytest.approx(PET_WEIGHT_KG * 1000 / PET_DOSE_BQ)


def _pet_times(injection_time: str | None = None, injection_datetime: str | None = None, series_time: str | None = None,
               decay: str = "START", units: str = "BQML", acquisition_step_s: float = 0.0):
    def edit(k, ds):
        ds.DecayCorrection, ds.Units = decay, units
        drug = ds.RadiopharmaceuticalInformationSequence[0]
        if injection_time is not None:
            del drug.RadiopharmaceuticalStartDateTime
            drug.RadiopharmaceuticalStartTime = injection_time
        if injection_datetime is not None:
            drug.RadiopharmaceuticalStartDateTime = injection_datetime
        if series_time is not None:
            ds.SeriesTime = series_time
        start = datetime.datetime.combine(datetime.date(2026, 5, 4), datetime.time(11, 0))
        ds.AcquisitionDate, ds.AcquisitionTime = "20260504", (start + datetime.timedelta(
            seconds=k * acquisition_step_s)).strftime("%H%M%S")
    return edit


@pytest.mark.parametrize("case,edit,hours", [
    ("START, injected 1 h 1.5 min before the series", _pet_times(), [61.5 / 60] * SHAPE[2]),
    ("NONE: each slice decayed to its acquisition", _pet_times(decay="NONE", acquisition_step_s=600),
     [61.5 / 60 + k / 6 for k in range(SHAPE[2])]),
    ("injected before midnight, scanned after (times only)", _pet_times(injection_time="233000", series_time="003000"),
     [1.0] * SHAPE[2]),
    ("Units GML: SUV already", _pet_times(units="GML"), None),
    ("scan 2 min before the recorded injection: clocks apart, no decay", _pet_times(injection_datetime="20260504110200"),
     [0.0] * SHAPE[2]),
    ("the same, times only", _pet_times(injection_time="110200"), [0.0] * SHAPE[2]),
])
def test_suv_follows_units_and_decay_correction(tmp_path, case, edit, hours):
    write_series(tmp_path / "pet", _volume("PT"), _affine("axial"), "PT", edit=edit)
    factors = [s.to_suv for s in read_series([tmp_path / "pet"], get_task("pet_synthesis")).slices]
    expected = [1.0] * SHAPE[2] if hours is None else [
        PET_WEIGHT_KG * 1000 / (PET_DOSE_BQ * 0.5 ** (h * 3600 / PET_HALF_LIFE_S)) for h in hours]
    np.testing.assert_allclose(sorted(factors), sorted(expected), rtol=1e-9)


def test_an_implausible_injection_time_is_refused_not_turned_into_suv(tmp_path):
    write_series(tmp_path / "pet", _volume("PT"), _affine("axial"), "PT",
                 edit=_pet_times(injection_datetime="20260503095830"))  # the day before: 25 h
    with pytest.raises(VolumeError, match="plausible time from injection to scan"):
        read_series([tmp_path / "pet"], get_task("pet_synthesis"))


def test_pet_without_the_tags_suv_needs_requires_a_range(tmp_path, capsys, tiny_weights):
    write_series(tmp_path / "pet", _volume("PT"), _affine("axial"), "PT", edit=lambda k, ds: delattr(ds, "PatientWeight"))
    code, _, err = run_cli(capsys, "infer", tmp_path / "pet", "--task", "pet_synthesis", "--weights", tiny_weights)
    assert_one_line_error(code, err, "missing PatientWeight")
    assert "--range" in err and not (tmp_path / "pet_pet_synthesis").exists()
    code, out, err = run_cli(capsys, "infer", tmp_path / "pet", "--task", "pet_synthesis", "--weights", tiny_weights,
                             "--range", "0", "5000")
    assert code == 0, err
    assert len(list(Path(out.strip()).iterdir())) == SHAPE[2]


def test_mri_sr_on_dicom_refines_the_grid_like_the_nifti_path(tmp_path, tiny_model, caplog):
    mr = _volume("MR")
    nifti = write_nifti(tmp_path / "mr.nii.gz", mr.astype(np.int16), affine=_affine("axial"))
    write_series(tmp_path / "mr", mr, _affine("axial"), "MR")
    with caplog.at_level(logging.WARNING, logger="medir_fast"):
        out = restore_file(tmp_path / "mr", tmp_path / "out", "mri_sr", model=tiny_model, scale=2)
    assert "range [0, 4095] of mri_sr is a guess" in caplog.text
    restore_file(nifti, tmp_path / "a.nii.gz", "mri_sr", model=tiny_model, scale=2)
    a = nib.load(tmp_path / "a.nii.gz")
    back = read_series([out], get_task("mri_sr"), range_given=True)
    assert back.shape == (2 * SHAPE[0], 2 * SHAPE[1], SHAPE[2])
    np.testing.assert_allclose(back.affine, a.affine, atol=1e-4)
    np.testing.assert_allclose(back.affine, resampled_affine(_affine("axial"), (0, 1), 2), atol=1e-4)
    expected = np.clip(np.asarray(a.dataobj), 0, 65535)
    assert np.max(np.abs(back.read() - expected)) <= 0.5 + 1e-3


# ---------------------------------------------------------------------- pydicom's own files


MR_SMALL_ENCODINGS = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                      "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]


@pytest.mark.parametrize("name", MR_SMALL_ENCODINGS)
def test_lossless_encodings_decode_to_the_same_values(name):
    task = get_task("mri_sr")
    reference = read_series([get_testdata_file("MR_small.dcm")], task, range_given=True).read()
    assert np.array_equal(read_series([get_testdata_file(name)], task, range_given=True).read(), reference)


def test_jpeg_2000_ct_decodes_to_the_uncompressed_ct():
    pytest.importorskip("data_store", reason="pydicom-data (the larger test files) is not installed")
    task = get_task("ct_denoise")
    compressed = read_series([get_testdata_file("693_J2KR.dcm")], task).read()
    assert np.array_equal(compressed, read_series([get_testdata_file("693_UNCR.dcm")], task).read())
    assert np.array_equal(compressed[:, :, 0], stored_physical([get_testdata_file("693_UNCR.dcm")])[:, :, 0])  # HU


def test_pydicoms_ct_slice_restores_to_dicom_and_nifti(tmp_path, tiny_model):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")
    out = restore_file(tmp_path / "CT_small.dcm", tmp_path / "out", "ct_denoise", model=tiny_model)
    nifti = restore_file(tmp_path / "CT_small.dcm", tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model)
    (written,) = out.iterdir()
    derived, source = pydicom.dcmread(written), pydicom.dcmread(tmp_path / "CT_small.dcm")
    assert derived.PatientName == source.PatientName and derived.pixel_array.dtype == source.pixel_array.dtype
    expected = np.asarray(nib.load(nifti).dataobj)[:, :, 0].T
    lo, hi = -32768 - 1024, 32767 - 1024  # int16 with intercept -1024
    assert np.max(np.abs(stored_physical([written])[:, :, 0].T - np.clip(expected, lo, hi))) <= 0.5 + 1e-3


def test_enhanced_ct_multiframe_is_restored_frame_by_frame(tmp_path, tiny_model):
    pytest.importorskip("data_store", reason="pydicom-data (the larger test files) is not installed")
    source = get_testdata_file("eCT_Supplemental.dcm")
    volume = read_series([source], get_task("ct_denoise"))
    assert volume.shape == (512, 512, 2)
    out = restore_file(source, tmp_path / "out", "ct_denoise", model=tiny_model, tile=0)
    nifti = restore_file(source, tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model, tile=0)
    (written,) = out.iterdir()
    derived = pydicom.dcmread(written)
    assert int(derived.NumberOfFrames) == 2 and list(derived.ImageType)[:2] == ["DERIVED", "PRIMARY"]  # enhanced IODs
    assert derived.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType[0] == "DERIVED"
    back = read_series([written], get_task("ct_denoise"))
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    expected = np.asarray(nib.load(nifti).dataobj)
    assert np.max(np.abs(back.read() - np.clip(expected, -1024, 65535 - 1024))) <= 0.5 + 1e-3


def test_a_one_frame_enhanced_ct_and_a_big_endian_mr_are_written_back(tmp_path, tiny_model):
    pytest.importorskip("data_store", reason="pydicom-data (the larger test files) is not installed")
    one = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    one.NumberOfFrames, one.PerFrameFunctionalGroupsSequence = 1, one.PerFrameFunctionalGroupsSequence[:1]
    one.PixelData = one.PixelData[: 512 * 512 * 2]
    (tmp_path / "ct").mkdir()
    one.save_as(tmp_path / "ct" / "one.dcm")
    out = restore_file(tmp_path / "ct", tmp_path / "ct_out", "ct_denoise", model=tiny_model, tile=0)
    back = read_series([out], get_task("ct_denoise"))
    assert back.shape == (512, 512, 1)
    assert np.linalg.norm(back.affine[:3, 2]) == pytest.approx(10.0)  # its PixelMeasuresSequence's SliceThickness
    big_endian = get_testdata_file("MR_small_bigendian.dcm")
    out = restore_file(big_endian, tmp_path / "mr_out", "mri_sr", model=tiny_model, intensity_range=(0, 4095))
    nifti = restore_file(big_endian, tmp_path / "mr.nii.gz", "mri_sr", model=tiny_model, intensity_range=(0, 4095))
    (written,) = out.iterdir()
    assert pydicom.dcmread(written).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    expected = np.clip(np.asarray(nib.load(nifti).dataobj)[:, :, 0].T, -32768, 32767)  # int16, no rescale
    assert np.max(np.abs(pydicom.dcmread(written).pixel_array - expected)) <= 0.5 + 1e-3


def test_an_enhanced_pet_keeps_its_rescale_type_in_every_frame_and_loses_its_value_mapping(tmp_path, tiny_model):
    """A new slope per frame moves the rescale out of the shared groups: its type must follow
    into every frame, and a real world value mapping of the old stored values must go."""
    pytest.importorskip("data_store", reason="pydicom-data (the larger test files) is not installed")
    pet = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    pet.SOPClassUID = pet.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedPETImageStorage
    pet.Modality = "PT"
    shared = pet.SharedFunctionalGroupsSequence[0]
    shared.PixelValueTransformationSequence[0].RescaleType = "BQML"
    assert "RealWorldValueMappingSequence" in shared
    (tmp_path / "pet").mkdir()
    pet.save_as(tmp_path / "pet" / "pet.dcm")
    out = restore_file(tmp_path / "pet", tmp_path / "out", "pet_synthesis", model=tiny_model, tile=0,
                       intensity_range=(0, 3000))
    (written,) = out.iterdir()
    derived = pydicom.dcmread(written)
    assert "PixelValueTransformationSequence" not in derived.SharedFunctionalGroupsSequence[0]
    assert [f.PixelValueTransformationSequence[0].RescaleType for f in derived.PerFrameFunctionalGroupsSequence] == [
        "BQML", "BQML"]
    assert not any(e.keyword == "RealWorldValueMappingSequence" for e in derived.iterall())


def test_a_sparse_header_is_completed_from_its_file_meta(tmp_path, tiny_model):
    """SOPClassUID only in the file meta, a one-valued ImageType: still read, and written as derived."""
    def sparse(k, ds):
        del ds.SOPClassUID
        ds.ImageType = "ORIGINAL"
    write_series(tmp_path / "in", _volume("CT"), _affine("axial"), "CT", edit=sparse)
    out = restore_file(tmp_path / "in", tmp_path / "out", "ct_denoise", model=tiny_model)
    derived = pydicom.dcmread(next(out.iterdir()))
    assert derived.SOPClassUID == pydicom.uid.CTImageStorage and list(derived.ImageType) == ["DERIVED", "SECONDARY"]


def test_a_series_without_instance_uids_is_still_restored_to_nifti(tmp_path, tiny_model):
    out = restore_file(_without_sop_instance_uid(tmp_path), tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model)
    assert nib.load(out).shape == SHAPE


def test_values_beyond_the_stored_type_are_clipped_and_counted(tmp_path, caplog):
    write_series(tmp_path / "in", _volume("CT"), _affine("axial"), "CT")
    volume = read_series([tmp_path / "in"], get_task("ct_denoise"))
    restored = volume.read().copy()
    restored[0, 0, 0], restored[1, 1, 1] = -5000.0, 70000.0  # below and above what uint16 - 1024 holds
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.WARNING, logger="medir_fast"):
        write_series_from_volume(tmp_path / "out", restored, volume, "d", "d")
    assert "2 output voxels fell outside" in caplog.text
    back = read_series([tmp_path / "out"], get_task("ct_denoise")).read()
    assert back[0, 0, 0] == -1024 and back[1, 1, 1] == 65535 - 1024


def test_an_enhanced_mr_without_plane_positions_is_refused():
    """pydicom's emri_small.dcm holds frames but no functional groups: nowhere to place them."""
    pytest.importorskip("data_store", reason="pydicom-data (the larger test files) is not installed")
    with pytest.raises(VolumeError, match="no valid ImagePositionPatient"):
        read_series([get_testdata_file("emri_small.dcm")], get_task("mri_sr"))


def test_supported_transfer_syntaxes_include_the_common_compressions():
    names = {s.name for s in supported_transfer_syntaxes()}
    assert {"RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)", "JPEG-LS Lossless Image Compression",
            "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])"} <= names


# ---------------------------------------------------------------------- the command line


def test_infer_on_a_series_folder_writes_a_folder_beside_it(tmp_path, capsys, ct_pair, tiny_weights, caplog):
    _, series = ct_pair
    (series / "README.txt").write_text("exported by a scanner")
    (series / "reports").mkdir()
    shutil.copy(get_testdata_file("liver_1frame.dcm"), series / "reports" / "segmentation")
    with caplog.at_level(logging.WARNING, logger="medir_fast"):
        code, out, err = run_cli(capsys, "infer", series, "--task", "ct_denoise", "--weights", tiny_weights)
    assert code == 0, err
    assert Path(out.strip()) == tmp_path / "series_ct_denoise" and len(list(Path(out.strip()).iterdir())) == SHAPE[2]
    assert "ignored 1 files that are neither DICOM nor NIfTI, 1 Segmentation Storage" in caplog.text


def test_infer_on_a_list_of_files_and_a_chosen_series(tmp_path, capsys, tiny_weights):
    first = write_series(tmp_path / "mixed", _volume("CT"), _affine("axial"), "CT", description="first")
    write_series(tmp_path / "mixed", _volume("CT", 1), _affine("axial"), "CT", description="second", seed=1)
    uid = pydicom.dcmread(first[0]).SeriesInstanceUID
    code, out, err = run_cli(capsys, "infer", tmp_path / "mixed", "--series", uid, "--task", "ct_denoise",
                             "--weights", tiny_weights, "-o", tmp_path / "one")
    assert code == 0, err
    assert {pydicom.dcmread(p).SeriesDescription for p in (tmp_path / "one").iterdir()} == {"first (medir-fast ct_denoise)"}
    code, out, err = run_cli(capsys, "infer", *first, "--task", "ct_denoise", "--weights", tiny_weights, "-o",
                             tmp_path / "two.nii.gz")
    assert code == 0, err
    assert nib.load(tmp_path / "two.nii.gz").shape == SHAPE


def test_preview_stream_and_progress_work_on_dicom(tmp_path, ct_pair, tiny_model):
    _, series = ct_pair
    done = []
    plain = restore_file(series, tmp_path / "a.nii.gz", "ct_denoise", model=tiny_model)
    streamed = restore_file(series, tmp_path / "b.nii.gz", "ct_denoise", model=tiny_model, stream=True,
                            preview=tmp_path / "p.png", progress=lambda total, axis: done.append)
    assert sum(done) == SHAPE[2] and (tmp_path / "p.png").stat().st_size > 0
    np.testing.assert_allclose(np.asarray(nib.load(streamed).dataobj), np.asarray(nib.load(plain).dataobj), atol=1e-4)


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path, ct_pair, tiny_model):
    _, series = ct_pair
    (tmp_path / "empty").mkdir()
    restore_file(series, tmp_path / "empty", "ct_denoise", model=tiny_model)
    assert len(list((tmp_path / "empty").iterdir())) == SHAPE[2]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.dcm").write_text("old")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        restore_file(series, tmp_path / "full", "ct_denoise", model=tiny_model)
    restore_file(series, tmp_path / "full", "ct_denoise", model=tiny_model, overwrite=True)
    assert "old.dcm" not in {p.name for p in (tmp_path / "full").iterdir()}
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_a_failed_write_leaves_no_folder_and_keeps_the_one_it_would_replace(tmp_path, ct_pair, tiny_model, monkeypatch):
    _, series = ct_pair
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.dcm").write_text("old")
    before = _tree(tmp_path)
    real_save, calls = pydicom.Dataset.save_as, []

    def failing_third_file(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)
    with monkeypatch.context() as patch:  # while the series is written
        patch.setattr(pydicom.Dataset, "save_as", failing_third_file)
        with pytest.raises(OSError, match="disk full"):
            restore_file(series, tmp_path / "new", "ct_denoise", model=tiny_model)
    assert _tree(tmp_path) == before
    real_replace, failed = os.replace, []

    def failing_to_place(src, dst, **kwargs):
        if ".partial" in Path(src).name and Path(dst) == tmp_path / "full" and not failed:
            failed.append(src)  # the new series, once; putting the old folder back then works
            raise OSError(28, "no space left on device")
        return real_replace(src, dst, **kwargs)
    with monkeypatch.context() as patch:  # while the finished series takes the place of the old folder
        patch.setattr(os, "replace", failing_to_place)
        with pytest.raises(OSError, match="no space"):
            restore_file(series, tmp_path / "full", "ct_denoise", model=tiny_model, overwrite=True)
    assert _tree(tmp_path) == before


def _series_with(edit):
    return lambda t: write_series(t / "in", _volume("CT"), _affine("axial"), "CT", edit=edit) and t / "in"


def _two_series(t):
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT", description="a")
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT", description="b", seed=1)
    return t / "in"


def _two_sizes(t):
    uid = pydicom.uid.generate_uid()
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT", series_uid=uid)
    write_series(t / "in", _volume("CT")[:20, :30], _affine("axial"), "CT", series_uid=uid, seed=1)
    return t / "in"


def _two_frames_of_reference(t):
    uid, shifted = pydicom.uid.generate_uid(), _affine("axial")
    shifted[2, 3] += SHAPE[2] * 2.5  # the next 5 slices, but measured in another frame of reference
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT", series_uid=uid)
    write_series(t / "in", _volume("CT"), shifted, "CT", series_uid=uid, seed=1)
    return t / "in"


def _move(k_moved, dz=0.0, dy=0.0, every=False):
    def edit(k, ds):
        if k == k_moved or every:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + dy * (k if every else 1), z + dz]
    return edit


def _unsupported_syntax(k, ds):
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level: video
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"


def _non_image_objects(t):
    (t / "in").mkdir()
    for name in ("rtstruct.dcm", "test-SR.dcm", "dicomdirtests/DICOMDIR"):
        shutil.copy(get_testdata_file(name), t / "in" / Path(name).name)
    return t / "in"


def _without_sop_instance_uid(t):
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT")
    path = next((t / "in").iterdir())
    ds = pydicom.dcmread(path)
    del ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(path)
    return t / "in"


def _without_preamble(t):
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT")
    for path in (t / "in").iterdir():
        path.write_bytes(path.read_bytes()[132:])  # the file meta group at offset 0
    return t / "in"


def _refused_beside_other_files(t):
    write_series(t / "in", _volume("CT"), _affine("axial"), "CT", edit=_move(4, dz=2.0))
    (t / "in" / "README.txt").write_text("exported by a scanner")
    return t / "in"


def _mr_series(t):
    write_series(t / "in", _volume("MR"), _affine("axial"), "MR")
    return t / "in"


def _nifti(t):
    return write_nifti(t / "in.nii.gz", _volume("CT").astype(np.int16))


def _empty(t):
    (t / "in").mkdir()
    return t / "in"


OK = _series_with(None)
# case -> (make the input in the folder, extra arguments ({tmp}: the folder), the message)
BAD_DICOM = {
    "two series without --series": (_two_series, [], "holds 2 image series; choose one with --series UID"),
    "an unknown --series": (OK, ["--series", "1.2.3"], "no image series 1.2.3"),
    "mixed sizes": (_two_sizes, [], "mixes image sizes"),
    "two frames of reference": (_two_frames_of_reference, [], "frames of reference"),
    "mixed orientations": (_series_with(lambda k, ds: k == 2 and setattr(ds, "ImageOrientationPatient",
                                                                          [0, 1, 0, -1, 0, 0])), [], "mixes orientations"),
    "missing ImagePositionPatient": (_series_with(lambda k, ds: k == 1 and delattr(ds, "ImagePositionPatient")), [],
                                     "no valid ImagePositionPatient"),
    "duplicated position": (_series_with(_move(3, dz=-2.5)), [], "at the same position"),
    "uneven spacing": (_series_with(_move(4, dz=2.0)), [], "uneven slice spacing"),
    "gantry tilt": (_series_with(_move(0, dy=0.8, every=True)), [], "sheared"),
    "unsupported transfer syntax": (_series_with(lambda k, ds: k == 0 and _unsupported_syntax(k, ds)), [],
                                    "MPEG2"),
    "empty folder": (_empty, [], "no files in"),
    "only non-image objects": (_non_image_objects, [], "no CT, MR or PET image"),
    "no SOPInstanceUID": (_without_sop_instance_uid, [], "has no SOPInstanceUID"),
    "DICOM without the file preamble": (_without_preamble, [], "5 DICOM data sets without the DICOM file preamble"),
    "a refusal names what was set aside": (_refused_beside_other_files, [],
                                           "(a missing slice?); ignored 1 files that are neither DICOM nor NIfTI"),
    "task of another modality": (_mr_series, [], "pass --force-task"),
    "NIfTI in, DICOM out": (_nifti, ["-o", "{tmp}/out"], "a NIfTI input is written as NIfTI"),
    "--out-dtype with DICOM out": (OK, ["--out-dtype", "float32"], "--out-dtype is for NIfTI output"),
    "--out-dtype input with DICOM in": (OK, ["--out-dtype", "input", "-o", "{tmp}/o.nii.gz"],
                                        "--out-dtype input needs a NIfTI input"),
    "--frame with DICOM": (OK, ["--frame", "0"], "--frame is for 4-D NIfTI input"),
    "output inside the input folder": (OK, ["-o", "{tmp}/in/out"], "inside the input folder"),
    "non-empty output folder": (OK, ["-o", "{tmp}/full"], "not empty; pass --overwrite"),
    "output is the input folder": (OK, ["-o", "{tmp}/in", "--overwrite"], "holds the input"),
    "a preview inside the output folder": (OK, ["-o", "{tmp}/full", "--overwrite", "--preview", "{tmp}/full/p.png"],
                                           "cannot go inside the folder"),
    "an output named like one file": (OK, ["-o", "{tmp}/out.dcm"], "give a folder name"),
    "PET with an implausible injection time": (
        lambda t: write_series(t / "in", _volume("PT"), _affine("axial"), "PT",
                               edit=_pet_times(injection_datetime="20260503095830")) and t / "in",
        ["--task", "pet_synthesis"], "plausible time from injection to scan"),
}


@pytest.mark.parametrize("case", list(BAD_DICOM))
def test_bad_dicom_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, tiny_weights, case):
    make, extra, message = BAD_DICOM[case]
    source = make(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("keep")
    before = _tree(tmp_path)
    code, out, err = run_cli(capsys, "infer", source, "--task", "ct_denoise", "--weights", tiny_weights,
                             *[a.format(tmp=tmp_path) for a in extra])
    assert_one_line_error(code, err, message)
    assert _tree(tmp_path) == before and not out


def test_the_root_folder_has_no_default_output_beside_it(capsys, tiny_weights):
    code, _, err = run_cli(capsys, "infer", "/", "--task", "ct_denoise", "--weights", tiny_weights)
    assert_one_line_error(code, err, "has no folder beside it for the output; give one with -o")


def test_force_task_runs_a_task_on_another_modality(tmp_path, tiny_model):
    with pytest.raises(VolumeError, match="the series is MR but ct_denoise restores CT"):
        read_input(_mr_series(tmp_path), get_task("ct_denoise"))
    out = restore_file(tmp_path / "in", tmp_path / "o.nii.gz", "ct_denoise", model=tiny_model, force_task=True)
    assert nib.load(out).shape == SHAPE


def test_small_spacing_jitter_is_warned_not_refused(tmp_path):
    write_series(tmp_path / "in", _volume("CT"), _affine("axial"), "CT", edit=_move(2, dz=0.01))
    volume = read_series([tmp_path / "in"], get_task("ct_denoise"))
    assert volume.shape == SHAPE and any("slice spacing varies" in note for note in volume.notes)
