"""Whole-model timing on one GPU: eager fp32, eager autocast bf16, torch.compile (autocast
bf16), the `triton` backend (bf16, fp16) and the engine backends (`aoti` fp32/bf16,
`onnxruntime` fp32/fp16 with the CUDA provider, `tensorrt` fp16; each where it can run here,
else the reason is printed), default AMIR configuration, random weights,
at 1 x 512x512 and 8 x 256x256. Prints a table and writes JSON (after every row, so an
interrupted run keeps what it measured).

    python benchmarks/gpu_bench.py --json $OUT/bench.json [--modes eager,compile,triton,engines] [--repeats 20]

The relative L2 error column is against the eager fp32 output of the same run (eager fp32 is
always run first for that reason).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import time

import torch

from medir_fast.backends import make_backend, unavailable_reason
from medir_fast.model.amir import AMIR

SHAPES = [(1, 512, 512), (8, 256, 256)]


def random_model(seed: int = 0) -> AMIR:
    """Default configuration; every parameter perturbed so no branch is inert (the official
    init zeroes the gates and channel-routing gamma/beta), temperatures kept positive."""
    torch.manual_seed(seed)
    model = AMIR()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
            if name.endswith("temperature"):
                p.abs_()
    return model.eval()


def timed(fn, x: torch.Tensor, warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds per call (CUDA events) and the last output."""
    for _ in range(warmup):
        out = fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def eager(model: AMIR, dtype: torch.dtype | None):
    def run(x):
        ctx = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return model(x).float()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_bench.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="eager,compile,triton",
                        help="comma-separated subset of eager, compile, triton, engines (compile takes minutes per "
                             "shape; an engine is built once per backend and precision, minutes for aoti)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing measured")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    model = random_model().to(device)
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, rows=[])

    wanted = set(args.modes.split(","))
    modes = [("eager fp32", lambda: eager(model, None))]
    if "eager" in wanted:
        modes.append(("eager autocast bf16", lambda: eager(model, torch.bfloat16)))
    if "compile" in wanted:
        compiled = torch.compile(model)
        modes.append(("torch.compile autocast bf16", lambda: eager(compiled, torch.bfloat16)))
    if "triton" in wanted:
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            modes.append((f"triton {label} (CUDA graph)",
                          lambda dtype=dtype: make_backend("triton", model, device, dtype).run))
    if "engines" in wanted:
        for backend, dtype, label in (("aoti", torch.float32, "fp32"), ("aoti", torch.bfloat16, "bf16"),
                                      ("onnxruntime", torch.float32, "fp32"), ("onnxruntime", torch.float16, "fp16"),
                                      ("tensorrt", torch.float16, "fp16")):
            reason = unavailable_reason(backend, device, dtype, model)
            if reason is not None:
                print(f"{backend} {label}: not run: {reason}")
                continue
            modes.append((f"{backend} {label}",
                          lambda backend=backend, dtype=dtype: make_backend(backend, model, device, dtype).run))

    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}")
    print(f"{'mode':<30} {'shape':<12} {'ms/batch':>9} {'ms/slice':>9} {'slices/s':>9} "
          f"{'relL2 vs fp32':>13} {'peak MiB':>9} {'first call s':>12}")
    for b, h, w in SHAPES:
        x = torch.rand(b, 1, h, w, device=device, generator=torch.Generator(device).manual_seed(1))
        reference = None
        for name, build in modes:
            torch.cuda.reset_peak_memory_stats()
            fn = build()
            t0 = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0  # compile / autotune / graph capture included
            ms, out = timed(fn, x, args.warmup, args.repeats)
            if reference is None:
                reference = out.float()
            rel = ((out.float().to(device) - reference).norm() / reference.norm()).item()  # onnxruntime: on the host
            row = dict(mode=name, batch=b, height=h, width=w, ms_per_batch=ms, ms_per_slice=ms / b,
                       slices_per_s=1000.0 * b / ms, rel_l2_vs_fp32=rel,
                       peak_mib=torch.cuda.max_memory_allocated() / 2**20, first_call_s=first)
            report["rows"].append(row)
            print(f"{name:<30} {f'{b}x{h}x{w}':<12} {ms:9.2f} {ms / b:9.2f} {row['slices_per_s']:9.1f} "
                  f"{rel:13.2e} {row['peak_mib']:9.0f} {first:12.1f}", flush=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
