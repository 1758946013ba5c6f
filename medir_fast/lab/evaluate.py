"""`medir-fast eval`: the official metrics for a model and classical baselines, per task.

Every method is scored per slice with `metrics.metrics` (clip to the task's evaluation
window, PSNR / SSIM / RMSE) and averaged per file and per modality. Baselines are tuned per
slice as well as the target allows (oracle: the parameter with the best PSNR against the
target is kept): BM3D for CT and PET, Gaussian filtering for PET; for MRI the baseline is the
zero-filled input itself. BM3D's noise level is searched around a wavelet (MAD) estimate of the
slice's noise; every grid widens while the best value sits on its edge. Baseline results are
cached by the content of the data, since they do not depend on the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..outputs import Outputs, write_atomically
from ..tasks import MODALITIES, TASKS, get_task, per_modality
from .metrics import metrics
from .paired import PairedVolume, read_pairs
from .sources import CACHE

BM3D_FACTORS = (0.75, 1.25, 2.0, 3.0, 4.5)  # x the MAD noise estimate; widened at the edges
GAUSSIAN_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # pixels
BASELINES = {"CT": ("bm3d",), "PET": ("bm3d", "gaussian"), "MRI": ()}
METRICS = ("psnr", "ssim", "rmse")


# --------------------------------------------------------------------------- baselines


def bm3d_denoise(x: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    return np.asarray(bm3d.bm3d(x.astype(np.float64), sigma_psd=sigma), dtype=np.float32)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x.astype(np.float64), sigma).astype(np.float32)


def _tuned(method: str, lq: np.ndarray, hq: np.ndarray, window) -> tuple[dict, float]:
    """Best-PSNR parameter of `method` for one slice -> (metrics, parameter).

    The grid widens by 1.5x (up to three times) while the best value sits on its edge.
    """
    tried: dict[float, dict] = {}

    def score(p: float) -> float:
        if p not in tried:
            out = bm3d_denoise(lq, p) if method == "bm3d" else _gaussian(lq, p)
            tried[p] = metrics(out, hq, window)
        return tried[p]["psnr"]

    if method == "gaussian":
        grid = list(GAUSSIAN_SIGMAS)
    else:
        from skimage.restoration import estimate_sigma

        sigma0 = max(float(estimate_sigma(lq.astype(np.float64))), 1e-6 * float(np.ptp(lq)) + 1e-12)
        grid = [sigma0 * f for f in BM3D_FACTORS]
    for _ in range(3):
        best = max(grid, key=score)
        if best == grid[-1]:
            grid.append(grid[-1] * 1.5)
        elif best == grid[0]:
            grid.insert(0, grid[0] / 1.5)
        else:
            break
    best = max(grid, key=score)
    return tried[best], best


def _digest(pair: PairedVolume, method: str) -> str:
    h = hashlib.sha256()
    for a in (pair.lq, pair.hq):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    grid = BM3D_FACTORS if method == "bm3d" else GAUSSIAN_SIGMAS
    h.update(repr((method, grid, get_task(pair.modality).window)).encode())
    return h.hexdigest()


def baseline_scores(pair: PairedVolume, method: str, cache: Path | None, progress: bool = True) -> dict:
    """Per-slice metrics and chosen parameters of a tuned baseline, cached by data content."""
    key = f"{method}:{_digest(pair, method)}"
    store = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    if key in store:
        return store[key]
    window = get_task(pair.modality).window
    per_slice, params = [], []
    for lq, hq in tqdm(list(zip(pair.lq, pair.hq)), desc=f"{method} {pair.modality}/{pair.name}", disable=not progress, leave=False):
        m, p = _tuned(method, lq, hq, window)
        per_slice.append(m)
        params.append(p)
    result = {"per_slice": per_slice, "params": params}
    if cache:
        store = json.loads(cache.read_text()) if cache.is_file() else {}  # re-read: another run may have added
        store[key] = result
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, lambda tmp: tmp.write_text(json.dumps(store)), "baseline cache")
    return result


# --------------------------------------------------------------------------- evaluation


def _mean(per_slice: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in per_slice])) for k in METRICS}


def evaluate(pairs: list[PairedVolume], restorers: dict | None, baselines: bool = True,
             cache: Path | None = None, progress: bool = True) -> dict:
    """{'files': {modality/name: {method: {...}}}, 'modalities': {modality: {method: means}}}.

    restorers: modality -> a `Restorer` for the model (None evaluates only input and baselines).
    Slices whose clipped target is flat (no contrast in the window) are skipped and counted.
    """
    files, by_modality = {}, {}
    for pair in pairs:
        window = get_task(pair.modality).window
        keep = [i for i, hq in enumerate(pair.hq) if np.ptp(np.clip(hq, *window)) > 0]
        skipped = len(pair.hq) - len(keep)
        pair = PairedVolume(pair.modality, pair.name, pair.lq[keep], pair.hq[keep])
        methods = {"input": {"per_slice": [metrics(a, b, window) for a, b in zip(pair.lq, pair.hq)]}}
        if restorers is not None:
            out = restorers[pair.modality].restore_slices(pair.lq)
            methods["model"] = {"per_slice": [metrics(a, b, window) for a, b in zip(out, pair.hq)]}
        if baselines:
            for method in BASELINES[pair.modality]:
                methods[method] = baseline_scores(pair, method, cache, progress)
        for name, result in methods.items():
            result.update(_mean(result["per_slice"]))
            by_modality.setdefault(pair.modality, {}).setdefault(name, []).extend(result["per_slice"])
        files[f"{pair.modality}/{pair.name}"] = {"modality": pair.modality, "task": get_task(pair.modality).name,
                                                 "slices": len(keep), "skipped_flat_slices": skipped, "methods": methods}
    summary = {mod: {name: dict(_mean(ps), slices=len(ps)) for name, ps in methods.items()} for mod, methods in by_modality.items()}
    return {"protocol": "v1", "windows": {t.modality: t.window for t in TASKS.values()}, "files": files, "modalities": summary}


def best_baseline(methods: dict) -> str:
    """The non-model method with the highest mean PSNR (the input counts: it is MRI's baseline)."""
    return max((m for m in methods if m != "model"), key=lambda m: methods[m]["psnr"])


def texture_change(restorer, clean: np.ndarray) -> float:
    """RMSE (physical units) by which a model changes noiseless slices, over target pixels inside the
    task's evaluation window.

    A denoiser that cannot tell an image's own fine texture from noise smooths a clean input too;
    on quiet slices that, more than the noise it leaves, is its error. 0 for a model that keeps it.
    """
    window = restorer.task.window
    inside = (clean >= window[0]) & (clean <= window[1])
    out = np.clip(restorer.restore_slices(clean), *window)
    return float(np.sqrt(np.mean((out - clean)[inside] ** 2)))


def table(report: dict) -> str:
    lines = [f"{'data':<28} {'method':<8} {'PSNR dB':>8} {'SSIM':>7} {'RMSE':>9}  vs best baseline"]
    rows = [(key, entry["methods"]) for key, entry in report["files"].items()]
    rows += [(f"{mod} (all files)", methods) for mod, methods in report["modalities"].items()]
    for key, methods in rows:
        best = best_baseline(methods)
        for name, m in methods.items():
            delta = f"{m['psnr'] - methods[best]['psnr']:+.2f} dB vs {best}" if name == "model" else ""
            lines.append(f"{key:<28} {name:<8} {m['psnr']:8.2f} {m['ssim']:7.4f} {m['rmse']:9.4g}  {delta}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_tile(spec: str | None, modalities: tuple[str, ...]) -> dict[str, int | None]:
    """`--tile`: None (the default per task), "80" for every modality, or "CT=80,MRI=128" naming each one."""
    from ..restorer import check_tile

    if spec is None:
        return dict.fromkeys(modalities)
    error = ValueError(f"--tile must be a size or one per modality like "
                       f"{','.join(f'{m}=64' for m in modalities)}; got {spec!r}")
    try:
        tiles = per_modality(spec, modalities, error) if "=" in spec else dict.fromkeys(modalities, int(spec))
    except ValueError:
        raise error from None
    for tile in tiles.values():
        if tile:  # 0: whole slices
            check_tile(tile)
    return tiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="paired data root: ROOT/{CT,MRI,PET}/{split}/{LQ,HQ}/*.nii[.gz]")
    parser.add_argument("--weights", help="checkpoint file or shipped model name (default: the shipped default)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of the task table's modalities")
    parser.add_argument("--json", help="write the full report (per-slice metrics, chosen parameters) here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json report")
    parser.add_argument("--no-model", action="store_true", help="only the degraded input and the baselines")
    parser.add_argument("--no-baselines", action="store_true", help="only the degraded input and the model")
    parser.add_argument("--baseline-cache", default=str(CACHE / "baselines.json"),
                        help="JSON cache of baseline results keyed by data content ('' disables)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--self-ensemble", action="store_true", help="score the model averaged over 8 flips and turns")
    parser.add_argument("--tile", help="score the model run on N x N overlapping tiles, as `infer --tile N`, or one size "
                        "per modality like CT=80,MRI=128,PET=64 (default: as infer, the shipped weights' tile per "
                        "task; 0: whole slices)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    from ..api import load_model
    from ..restorer import Restorer

    if args.threads:
        torch.set_num_threads(args.threads)
    modalities = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise ValueError(f"--modalities must be a subset of {','.join(MODALITIES)}, got {args.modalities!r}")
    if args.json:  # checked before the (long) evaluation
        Outputs(overwrite=args.overwrite).add(args.json, "report")
    pairs = read_pairs(args.data, args.split, modalities)
    restorers, tiles = None, {}
    if not args.no_model:
        model = load_model(args.weights, device=args.device)
        asked = parse_tile(args.tile, modalities)
        restorers = {m: Restorer(model, m, backend="eager", device=args.device, precision="fp32",
                                 batch_size=args.batch_size, tile=asked[m], self_ensemble=args.self_ensemble)
                     for m in modalities}
        tiles = {m: r.tile for m, r in restorers.items()}
    cache = Path(args.baseline_cache) if args.baseline_cache else None
    report = evaluate(pairs, restorers, baselines=not args.no_baselines, cache=cache)
    report.update(weights=None if args.no_model else (args.weights or "shipped default"), data=str(args.data), split=args.split,
                  self_ensemble=args.self_ensemble, tile=tiles)
    print(table(report))
    if args.json:
        clean = json.loads(json.dumps(report), parse_constant=lambda c: None)  # inf PSNR -> null
        write_atomically(args.json, lambda tmp: tmp.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n"),
                         "report", overwrite=args.overwrite)
    return 0
