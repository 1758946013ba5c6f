"""Does a model follow the noise it is given? Validation slices degraded at other levels than protocol v1's.

The held-out test slices at the top of each volume are smaller (CT) and fainter (PET) than the
training slices, so their noise differs from anything a network trained on protocol v1 alone has
seen. Other patients' CT slices on a finer grid are far noisier (the other-volume test set). This
re-degrades the *validation* slices (never trained on, not the test set) at such levels: CT at 8x
the dose and as a head 0.6x as large (both give less noise), PET at 0.3x the uptake (fewer
counts), CT at 0.25x and 0.1x the dose (more noise), next to protocol v1 itself, and scores each
model against the input and the per-slice tuned baselines of `medir-fast eval`. It also reports how
much each model changes the noiseless validation CT (`evaluate.texture_change`): the scan's own
texture that it smooths away, which bounds how well it can do on quiet slices. The body-CT
validation patient is the quietest body scan here (its input about 9 dB above the test abdomen's
under protocol v1), so one row gives it 1/8 of the dose, which brings it to the abdomen's noise:
the noisy body scans have a validation row.

    python experiments/noise_levels.py WEIGHTS [WEIGHTS ...] [--tile CT=80,PET=64] [--json out.json] [--no-baselines]

WEIGHTS: a file or a shipped name. A shipped model runs in the tiles it was validated at, as
`medir-fast infer` and `eval` run it; `--tile` (as in `eval`) sets them for every model, so that
a candidate file runs like the shipped model it is compared with.
"""

import argparse
import json

import torch

from medir_fast.api import load_model
from medir_fast.lab import paired, simulate
from medir_fast.lab.evaluate import evaluate, parse_tile, texture_change
from medir_fast.lab.paired import PairedVolume
from medir_fast.restorer import Restorer

CONDITIONS = {  # name: (source, dose or uptake factor, head size factor)
    "CT protocol v1": ("ct_cranium", 1.0, 1.0),
    "CT 8x dose": ("ct_cranium", 8.0, 1.0),
    "CT head 0.6x": ("ct_cranium", 1.0, 0.6),
    "PET protocol v1": ("pet_fdg_template", 1.0, None),
    "PET 0.3x uptake": ("pet_fdg_template", 0.3, None),
    "CT 0.25x dose": ("ct_cranium", 0.25, 1.0),
    "CT 0.1x dose": ("ct_cranium", 0.1, 1.0),
    "body CT 0.125x dose": (paired.BODY_CT_SPLIT["val"][0], 0.125, 1.0),
}
SOURCE = {"CT": "ct_cranium", "PET": "pet_fdg_template"}  # the restorers' modalities; the noiseless CT


def pairs() -> list[PairedVolume]:
    paths = paired.fetch(names=tuple({source for source, _, _ in CONDITIONS.values()}))
    out = []
    for seed, (name, (source, level, size)) in enumerate(CONDITIONS.items()):
        volume, zooms = paired.clean_volume(source, paths[source])
        modality = paired.SOURCE_MODALITY[source]
        if source in paired.SPLITS:
            a, b = paired.SPLITS[source]["val"]
            hq = volume[a:b]
        else:  # a body-CT validation patient: every slice is validation; its held-out slices
            hq = volume[paired.held_out_body_slices(len(volume))]
        if modality == "CT":
            lq, hq = simulate.simulate_ct(hq, pixel_mm=zooms[0] * size, seed=100 + seed, i0=simulate.CT_I0 * level)
        else:
            hq = hq * level
            lq = simulate.simulate_pet(hq, seed=100 + seed)
        out.append(PairedVolume(modality, name, lq, hq))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--tile", help="a size or one per modality, like CT=80,PET=64 (0: whole slices)")
    parser.add_argument("--json")
    parser.add_argument("--no-baselines", action="store_true",
                        help="score the input and the models only (tuned BM3D takes minutes on the body row)")
    args = parser.parse_args()
    try:
        asked = parse_tile(args.tile, tuple(SOURCE))
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(2)
    degraded = pairs()
    report = evaluate(degraded, None, baselines=not args.no_baselines, progress=False)
    rows = {f: {m: r["psnr"] for m, r in v["methods"].items()} for f, v in report["files"].items()}
    clean_ct = next(p.hq for p in degraded if p.name == "CT protocol v1")
    texture = {}
    for weights in args.weights:
        model = load_model(weights)
        restorers = {m: Restorer(model, m, backend="eager", precision="fp32", tile=asked[m]) for m in SOURCE}
        scored = evaluate(degraded, restorers, baselines=False, progress=False)
        for f, v in scored["files"].items():
            rows[f][weights] = v["methods"]["model"]["psnr"]
        texture[weights] = texture_change(restorers["CT"], clean_ct)
    columns = ["input", "bm3d", "gaussian", *args.weights]
    print("PSNR dB on the validation slices | " + " | ".join(columns))
    for f, row in rows.items():
        print(f.split("/", 1)[1] + " | " + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in columns))
    print("noiseless validation CT changed by (HU RMSE inside the window) | " + " | ".join(f"{texture[w]:.2f}" for w in args.weights))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"conditions": CONDITIONS, "psnr": rows, "texture_change_hu": texture}, fh, indent=1)


if __name__ == "__main__":
    main()
