"""Files no one here wrote and files made to break us: nibabel's own test data, every dtype in both
byte orders, hostile headers. Each restores with exact geometry and the right values, or is
refused in one line (exit 2) with nothing written and the input untouched."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.volumeutils import array_to_file

from medir_fast import Restorer, restore_file
from medir_fast.cli import main
from medir_fast.io import VolumeError, read_volume

from .conftest import DATA, write_nifti

TINY = DATA / "tiny_state_dict.pth"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _nifti_files(folder: Path) -> list[Path]:
    """Every NIfTI-1/2 file in `folder`, found by its header (sizeof_hdr 348 or 540, either byte
    order, NIfTI magic), whatever its name."""
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                head = f.read(548)
        except OSError:
            continue
        sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
        magic = head[344:347] if 348 in sizes else head[4:7]
        if sizes & {348, 540} and magic in (b"n+1", b"ni1", b"n+2", b"ni2"):
            found.append(path)
    return found


NIBABEL_NIFTI = _nifti_files(NIBABEL_DATA)


def run_infer(capsys, *args) -> tuple[int, str]:
    code = main(["infer", *map(str, args), "--task", "ct_denoise", "--weights", str(TINY)])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, folder: Path, before: list[str], pattern: str = "") -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, no temporary left


def rewrite_in_byte_order(src: Path, dst: Path, endianness: str) -> Path:
    """The same header fields (scaling included) and stored values, in the other byte order,
    written with nibabel's own header and array writers."""
    image = nib.load(src)
    header = image.header.as_byteswapped(endianness)
    header.set_slope_inter(image.dataobj.slope, image.dataobj.inter)  # nibabel moves them off the header on load
    stored = np.asarray(image.dataobj.get_unscaled())
    with open(dst, "wb") as f:
        header.write_to(f)
        array_to_file(stored, f, header.get_data_dtype(), header.get_data_offset(), order="F")
    copy = nib.load(dst)
    assert copy.header.endianness == endianness and (copy.dataobj.slope, copy.dataobj.inter) == (
        image.dataobj.slope, image.dataobj.inter)
    np.testing.assert_array_equal(np.asarray(copy.dataobj.get_unscaled()), stored)
    return dst


def geometry(img) -> tuple:
    h = img.header
    return (np.round(h.get_qform(), 5).tolist(), int(h["qform_code"]), np.round(h.get_sform(), 5).tolist(),
            int(h["sform_code"]), h.get_xyzt_units(), tuple(np.round(h.get_zooms()[:3], 6)))


def test_nibabel_test_data_is_found():
    names = {p.name for p in NIBABEL_NIFTI}
    assert {"anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz"} <= names, names


@pytest.mark.parametrize("path", NIBABEL_NIFTI, ids=[p.name for p in NIBABEL_NIFTI])
def test_nibabel_test_file_restores_exactly_or_is_refused(tmp_path, capsys, tiny_model, path):
    """Restored: the geometry of the input, values those of restoring the voxels nibabel reads
    (`get_fdata`, so byte order and scaling are nibabel's, not ours), and those of the same data
    rewritten in native byte order. Else one line naming why."""
    src = tmp_path / path.name
    src.write_bytes(path.read_bytes())
    out = tmp_path / "out.nii.gz"
    image = nib.load(src) if src.name.endswith((".nii", ".nii.gz")) else None
    frame = ["--frame", "0"] if image is not None and len(image.shape) == 4 else []
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_infer(capsys, src, "-o", out, *frame)
    if code != 0:
        assert_refused(code, err, tmp_path, before)
        assert src.read_bytes() == path.read_bytes()
        return
    restored = nib.load(out)
    assert restored.header.endianness == "<" and restored.get_data_dtype() == np.float32
    assert geometry(restored) == geometry(image)
    voxels = image.get_fdata(dtype=np.float32)[..., 0] if frame else image.get_fdata(dtype=np.float32)
    axis = read_volume(src, frame=0 if frame else None).slice_axis()
    expected = Restorer(tiny_model, "ct_denoise").restore_volume(voxels, axis=axis)
    np.testing.assert_array_equal(restored.get_fdata(dtype=np.float32), expected)

    native = rewrite_in_byte_order(src, tmp_path / "native.nii", "<")
    code, err = run_infer(capsys, native, "-o", tmp_path / "native_out.nii", *frame)
    assert code == 0, err
    np.testing.assert_array_equal(nib.load(tmp_path / "native_out.nii").get_fdata(dtype=np.float32),
                                  restored.get_fdata(dtype=np.float32))


REAL_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64]


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=[np.dtype(d).name for d in REAL_DTYPES])
def test_every_dtype_in_both_byte_orders_restores_alike(tmp_path, tiny_model, dtype, scaled):
    """The same values stored big- and little-endian, with and without scl_slope/scl_inter:
    identical outputs, as float32 and in the input's own type."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    rng = np.random.default_rng(11)
    lo, hi = (max(info.min, -1000), min(info.max, 3000)) if info else (-1000, 3000)
    raw = rng.integers(lo, hi, size=(17, 19, 3)).astype(dtype)
    slope, inter = (2.0, -1024.0) if scaled else (None, None)
    outs = {}
    for order in "<>":
        src = write_nifti(tmp_path / f"in{order == '>'}.nii", raw, dtype=dtype, slope=slope, inter=inter)
        if order == ">":
            src = rewrite_in_byte_order(src, tmp_path / "big.nii", ">")
        for out_dtype in ("float32", "input"):
            out = tmp_path / f"o{order == '>'}{out_dtype}.nii"
            try:
                restore_file(src, out, "ct_denoise", model=tiny_model, out_dtype=out_dtype)
            except VolumeError as exc:  # values beyond a small unsigned type: refused, never clipped
                assert out_dtype == "input" and "do not fit the input's type" in str(exc)
                assert not out.exists()
                outs[order, out_dtype] = str(exc)
                continue
            img = nib.load(out)
            assert img.header.endianness == "<"
            outs[order, out_dtype] = (img.get_fdata(), geometry(img), img.get_data_dtype().newbyteorder("="))
    for out_dtype in ("float32", "input"):
        little, big = outs["<", out_dtype], outs[">", out_dtype]
        if isinstance(little, str):
            assert little.split(" of ")[0] == big.split(" of ")[0]
            continue
        np.testing.assert_array_equal(little[0], big[0])
        assert little[1:] == big[1:]
    expected = Restorer(tiny_model, "ct_denoise").restore_volume(
        nib.load(tmp_path / "inFalse.nii").get_fdata(dtype=np.float32), axis=2)
    np.testing.assert_array_equal(outs["<", "float32"][0], expected)


# --------------------------------------------------------------------------- hostile headers


def _valid(tmp_path: Path, name: str = "in.nii") -> Path:
    rng = np.random.default_rng(0)
    return write_nifti(tmp_path / name, rng.normal(40, 300, (20, 18, 3)).astype(np.int16), dtype=np.int16)


def _patch(path: Path, offset: int, fmt: str, value) -> Path:
    data = bytearray(path.read_bytes())
    data[offset: offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
    return path


def _gz(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return gz


# NIfTI-1 field offsets: dim[8] int16 at 40, datatype int16 at 70, bitpix at 72, vox_offset float32 at 108
HOSTILE = {
    "dim0 zero": (lambda t: _patch(_valid(t), 40, "<h", 0), "not 1..7"),
    "dim0 eight": (lambda t: _patch(_valid(t), 40, "<h", 8), "not 1..7"),
    "negative dimension": (lambda t: _patch(_valid(t), 42, "<h", -20), "negative dimension"),
    "zero dimension": (lambda t: _patch(_valid(t), 44, "<h", 0), "size 0"),
    "gigabytes claimed in a small file": (lambda t: _patch(_patch(_valid(t), 42, "<h", 32767), 44, "<h", 32767),
                                          "is truncated"),
    "gigabytes claimed, gzipped": (lambda t: _gz(_patch(_patch(_valid(t), 42, "<h", 32767), 44, "<h", 32767)),
                                   "is truncated"),
    "unknown datatype": (lambda t: _patch(_valid(t), 70, "<h", 77), "unknown datatype code 77"),
    "binary datatype": (lambda t: _patch(_valid(t), 70, "<h", 1), "binary voxels"),
    "complex datatype code": (lambda t: _patch(_patch(_valid(t), 70, "<h", 32), 72, "<h", 64), "complex64 voxels"),
    "complex voxels": (lambda t: write_nifti(t / "c.nii", np.ones((16, 16, 2), np.complex64)), "complex64 voxels"),
    "RGB voxels": (lambda t: _rgb(t), "RGB voxels"),
    "voxel offset inside the header": (lambda t: _patch(_valid(t), 108, "<f", 100.0), "voxel offset 100"),
    "voxel offset NaN": (lambda t: _patch(_valid(t), 108, "<f", float("nan")), "voxel offset nan"),
    "voxel offset past the end": (lambda t: _patch(_valid(t), 108, "<f", 1e9), "is truncated"),
    "voxel offset fractional": (lambda t: _patch(_valid(t), 108, "<f", 400.5), "whole number"),
    "cut inside the header": (lambda t: _cut(_valid(t), 200), "no NIfTI-1/2 header"),
    "cut inside the voxels": (lambda t: _cut(_valid(t), 1500), "is truncated"),
    "cut gzip": (lambda t: _cut(_gz(_valid(t)), 300), "cannot read"),
    "header of a pair": (lambda t: _pair_header(t), ".hdr/.img pair"),
    "NIfTI-2 magic in a NIfTI-1 header": (lambda t: _patch(_valid(t), 344, "4s", b"n+2\x00"), "bad magic"),
    "not a header at all": (lambda t: _bytes(t, b"\x00" * 400), "no NIfTI-1/2 header"),
    "empty file": (lambda t: _bytes(t, b""), "no NIfTI-1/2 header"),
    "five dimensions": (lambda t: write_nifti(t / "5d.nii", np.ones((16, 16, 2, 2, 2), np.float32)), "5 dimensions"),
    "one dimension": (lambda t: write_nifti(t / "1d.nii", np.ones((16,), np.float32)), "1 dimensions"),
    "NIfTI-2 gigabytes claimed": (lambda t: _nifti2_claiming(t, 2**40), "is truncated"),
}


def _rgb(t: Path) -> Path:
    rgb = np.zeros((16, 16, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    img = nib.Nifti1Image(rgb, np.eye(4))
    img.to_filename(t / "rgb.nii")
    return t / "rgb.nii"


def _cut(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def _bytes(t: Path, data: bytes) -> Path:
    (t / "junk.nii").write_bytes(data)
    return t / "junk.nii"


def _pair_header(t: Path) -> Path:
    path = _valid(t)
    return _patch(path, 344, "4s", b"ni1\x00")


def _nifti2_claiming(t: Path, size: int) -> Path:
    img = nib.Nifti2Image(np.ones((16, 16, 2), np.float32), np.eye(4))
    img.to_filename(t / "n2.nii")
    return _patch(t / "n2.nii", 16 + 8, "<q", size)  # dim[1] (int64 array at 16)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_refused_in_one_line(tmp_path, capsys, case):
    make, pattern = HOSTILE[case]
    src = make(tmp_path)
    original = src.read_bytes()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_infer(capsys, src, "-o", tmp_path / "o.nii.gz")
    assert_refused(code, err, tmp_path, before, pattern)
    assert src.read_bytes() == original


@pytest.mark.parametrize("case", ["gigabytes claimed in a small file", "gigabytes claimed, gzipped",
                                  "NIfTI-2 gigabytes claimed", "voxel offset past the end"])
def test_memory_before_a_refusal_does_not_follow_the_header(tmp_path, case):
    src = HOSTILE[case][0](tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError):
            read_volume(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # what the file holds, never the terabytes the header claims


def _base(tmp_path: Path, kind: str) -> Path:
    """A valid small volume: NIfTI-1 int16, NIfTI-1 float64 big-endian, NIfTI-2 float32, or gzipped."""
    data = np.random.default_rng(0).normal(40, 300, (20, 18, 3))
    if kind == "nifti2":
        nib.Nifti2Image(data.astype(np.float32), np.diag([0.8, 0.8, 2.5, 1])).to_filename(tmp_path / "base.nii")
        return tmp_path / "base.nii"
    if kind == "big-endian":
        write_nifti(tmp_path / "le.nii", data, dtype=np.float64)
        return rewrite_in_byte_order(tmp_path / "le.nii", tmp_path / "base.nii", ">")
    return _valid(tmp_path, "base.nii")


@pytest.mark.parametrize("kind", ["nifti1", "big-endian", "nifti2", "gzip"])
def test_randomly_damaged_headers_restore_or_are_refused(tmp_path, capsys, kind):
    """Seeded random bytes in the header: exit 0 with a finite output, or one line and exit 2,
    never a traceback or an internal error."""
    good = _base(tmp_path, "nifti1" if kind == "gzip" else kind).read_bytes()
    header_size = 540 if kind == "nifti2" else 348
    outcomes = {0: 0, 2: 0}
    for seed in range(30):
        rng = np.random.default_rng(seed)
        data = bytearray(good)
        for pos in rng.integers(0, header_size + 4, size=rng.integers(1, 5)):
            data[pos] = int(rng.integers(0, 256))
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        name = "in.nii.gz" if kind == "gzip" else "in.nii"
        (folder / name).write_bytes(gzip.compress(bytes(data)) if kind == "gzip" else bytes(data))
        original = (folder / name).read_bytes()
        code, err = run_infer(capsys, folder / name, "-o", folder / "o.nii")
        outcomes[code] += 1
        if code == 0:
            assert np.isfinite(nib.load(folder / "o.nii").get_fdata()).all()
            assert err == ""
        else:
            assert_refused(code, err, folder, [name])
        assert (folder / name).read_bytes() == original
    assert outcomes[0] and outcomes[2]  # the generator reaches both outcomes


def test_a_flipped_bit_inside_a_gzip_stream_is_refused(tmp_path, capsys):
    """Stored (uncompressed) deflate blocks stay decodable with a flipped bit: only the gzip CRC-32
    at the end of the stream tells, and nibabel stops reading before it."""
    raw = bytearray(_valid(tmp_path, "v.nii").read_bytes())
    (tmp_path / "v.nii").unlink()
    packed = bytearray(gzip.compress(bytes(raw), compresslevel=0))
    packed[len(packed) // 2] ^= 0x10
    src = tmp_path / "in.nii.gz"
    src.write_bytes(bytes(packed))
    code, err = run_infer(capsys, src, "-o", tmp_path / "o.nii.gz")
    assert_refused(code, err, tmp_path, ["in.nii.gz"], "CRC")
