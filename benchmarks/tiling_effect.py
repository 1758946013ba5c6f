"""How much tiling changes AMIR's output on a real volume: PSNR of tiled against whole-slice.

    python benchmarks/tiling_effect.py VOLUME.nii.gz --task ct_denoise [--weights W] [--tiles 64 128] [--slices 8]

AMIR's attention and task prompt are global over the input, so a tile sees less context than
the whole slice. PSNR is computed in the task's display window (R = its width), per slice,
over the middle slices of the volume.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medir_fast import Restorer, get_task, load_model
from medir_fast.io import read_volume


def psnr(a: np.ndarray, b: np.ndarray, window: tuple[float, float]) -> float:
    lo, hi = window
    a, b = np.clip(a, lo, hi), np.clip(b, lo, hi)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10((hi - lo) ** 2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("volume")
    p.add_argument("--task", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    p.add_argument("--slices", type=int, default=8)
    args = p.parse_args()
    task = get_task(args.task)
    volume = read_volume(args.volume)
    axis = volume.slice_axis()
    middle = volume.shape[axis] // 2
    slices = volume.slab(axis, max(0, middle - args.slices // 2), min(volume.shape[axis], middle + (args.slices + 1) // 2))
    model = load_model(args.weights)
    whole = Restorer(model, task, batch_size=4, tile=0).restore_slices(slices)
    rows = []
    for tile in args.tiles:
        t0 = time.perf_counter()
        tiled = Restorer(model, task, batch_size=4, tile=tile).restore_slices(slices)
        values = [psnr(t, w, task.window) for t, w in zip(tiled, whole)]
        rows.append(dict(tile=tile, psnr_db_mean=float(np.mean(values)), psnr_db_min=float(np.min(values)),
                         seconds=time.perf_counter() - t0))
    print(json.dumps(dict(volume=args.volume, task=task.name, slice_shape=list(slices.shape[1:]),
                          slices=len(slices), weights=args.weights or "shipped default", results=rows,
                          date=time.strftime("%Y-%m-%d")), indent=2))


if __name__ == "__main__":
    main()
