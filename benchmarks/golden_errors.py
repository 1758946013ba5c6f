"""Errors against the official AMIR on the golden cases: fp32 parity and fp16/bf16 autocast.

    python benchmarks/golden_errors.py

Prints, per golden case and input, the max abs error of the fp32 output and the relative L2 error
of the autocast fp16 and bf16 outputs (CPU), against the official fp32 output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medir_fast.model import build_model

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def main() -> None:
    rows = []
    for case in sorted(json.loads((DATA / "manifest.json").read_text())):
        model = build_model(torch.load(DATA / f"{case}_state_dict.pth", weights_only=True))
        io = torch.load(DATA / f"{case}_io.pt", weights_only=True)
        for x, y in zip(io["inputs"], io["outputs"]):
            row = dict(case=case, shape=list(x.shape))
            with torch.no_grad():
                row["fp32_max_abs"] = (model(x) - y).abs().max().item()
                for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                    with torch.autocast("cpu", dtype=dtype):
                        out = model(x)
                    row[f"{name}_rel_l2"] = ((out.float() - y).norm() / y.norm()).item()
            rows.append(row)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
