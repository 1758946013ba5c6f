"""What reading and writing a DICOM series costs beside the same volume in NIfTI, and beside the
network: headers, decoding, checks and the derived series' write-and-read-back, per slice.

    python benchmarks/dicom_io.py [--slices 100] [--size 512] [--rounds 3]

A CT volume of random integer HU is written once as a series (one file per slice, as a scanner
exports it, by tests/dicom_series.py) and once as .nii.gz. Each round, interleaved: the NIfTI path
(read_volume, every slab, save_volume) and the DICOM path (read_series, every slab,
write_series). The median of the rounds is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medir_fast.io import read_volume, save_volume  # noqa: E402
from medir_fast.io.dicom import read_series, write_series  # noqa: E402
from medir_fast.tasks import get_task  # noqa: E402
from tests.conftest import write_nifti  # noqa: E402
from tests.dicom_series import write_series as write_test_series  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    task = get_task("ct_denoise")
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 300, size=(args.size, args.size, args.slices)).clip(-1024, 3000).round()
    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nifti = write_nifti(tmp / "ct.nii.gz", hu.astype(np.int16), affine=affine)
        write_test_series(tmp / "series", hu, affine, "CT")
        times = {"nifti_read_s": [], "nifti_write_s": [], "dicom_read_s": [], "dicom_write_s": []}
        for r in range(args.rounds):
            start = time.perf_counter()
            volume = read_volume(nifti)
            data = np.concatenate(list(volume.slabs(2, 8))).transpose(1, 2, 0)
            times["nifti_read_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            save_volume(tmp / f"out{r}.nii.gz", data, volume)
            times["nifti_write_s"].append(time.perf_counter() - start)

            start = time.perf_counter()
            series = read_series([tmp / "series"], task)
            data = np.concatenate(list(series.slabs(2, 8))).transpose(1, 2, 0)
            times["dicom_read_s"].append(time.perf_counter() - start)
            (tmp / f"out{r}").mkdir()
            start = time.perf_counter()
            write_series(tmp / f"out{r}", data, series, "bench", "bench")
            times["dicom_write_s"].append(time.perf_counter() - start)
    result = {key: round(float(np.median(v)), 3) for key, v in times.items()}
    result |= {key.replace("_s", "_ms_per_slice"): round(1000 * value / args.slices, 2) for key, value in result.items()}
    print(json.dumps({"slices": args.slices, "size": args.size, "rounds": args.rounds, **result}, indent=1))


if __name__ == "__main__":
    main()
