"""Put a trained model into the package: weights file + manifest entry (config, sha256, training, metrics).

Usage: python scripts/ship_weights.py NAME RUN_DIR EVAL_JSON [--default]
RUN_DIR holds `last.pt` from `medir-fast train`; EVAL_JSON is `medir-fast eval --json` on held-out data.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medir_fast import data, weights  # noqa: E402
from medir_fast.evaluate import best_baseline  # noqa: E402
from medir_fast.training import save_atomic  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("eval_json", type=Path)
    parser.add_argument("--default", action="store_true", help="make it the model load() returns by default")
    parser.add_argument("--augmented-copies", type=json.loads, default=None,
                        help='augmented training copies per modality the run saw, as JSON, e.g. \'{"CT": 3}\'')
    args = parser.parse_args()

    state = torch.load(args.run_dir / "last.pt", map_location="cpu", weights_only=True)
    target = weights.HERE / f"{args.name}.pth"
    save_atomic({k: v.contiguous() for k, v in state["model"].items()}, target)
    report = json.loads(args.eval_json.read_text())
    metrics = {}
    for modality, methods in report["modalities"].items():
        best = best_baseline(methods)
        metrics[modality] = {
            "methods": {m: {k: round(v, 4) for k, v in r.items()} for m, r in methods.items()},
            "best_baseline": best,
            "model_minus_best_baseline_psnr_db": round(methods["model"]["psnr"] - methods[best]["psnr"], 3),
        }
    sources = json.loads((data.CACHE / "sources" / "sources.json").read_text())
    stage = {
        "init": state.get("init"), "steps": state["step"], "training_seconds": round(state["seconds"]),
        "batch_size": state["batch_size"], "crop": state["crop"], "lr": state["lr"],
        "schedule": f"cosine over {state['time_budget']} min of training" if state["time_budget"] else f"cosine over {state['steps']} steps",
        "modalities": state["modalities"], "augmented_copies": args.augmented_copies,
        "device": f"CPU (shared 2-core machine, {state.get('threads', 1)} thread(s))",
    }
    stages = [stage]
    previous = weights.manifest()["models"].get(state.get("init") or "")
    if previous:  # fine-tuned from a shipped model: keep its history
        stages = previous["training"].get("stages") or [{k: v for k, v in previous["training"].items() if k not in ("data", "protocol")}]
        stages = [*stages, stage]
    entry = {
        "file": target.name,
        "sha256": weights.sha256(target),
        "config": state["config"],
        "state_dict_elements": sum(v.numel() for v in state["model"].values()),  # parameters + 6 MoE buffers
        "training": {
            "data": {name: {k: s[k] for k in ("package", "version", "license", "what")} | {"slices": data.SPLITS[name]}
                     for name, s in sources.items()},
            "protocol": "medir_fast.simulate v1",
            "stages": stages,
        },
        "metrics": {"split": report.get("split"), "per_modality": metrics},
    }
    manifest = weights.manifest()
    manifest["models"][args.name] = entry
    if args.default or not manifest.get("default"):
        manifest["default"] = args.name
    tmp = weights.MANIFEST.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(weights.MANIFEST)
    print(f"shipped {args.name}: {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 {entry['sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
