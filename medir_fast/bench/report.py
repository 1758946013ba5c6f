"""What `medir-fast bench` tells: the machine it ran on, a terminal table, Markdown and a plot."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("medir-fast", "torch", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "triton",
             "tensorrt", "bm3d", "scikit-image")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def machine(device: torch.device) -> dict:
    """The facts a reader needs to compare two runs."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                os=platform.platform(), python=platform.python_version(), cpu=_cpu_model(),
                cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
                device=str(device), gpu=None, libraries=versions)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                           memory_gb=round(props.total_memory / 1e9, 1), driver=_driver(), cuda=torch.version.cuda,
                           tf32=False)
    return info


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _memory(row: dict) -> str:
    """The process's (CPU) or torch's (CUDA) peak during the row's calls, and the most one call added."""
    if row["peak_mem_mb"] is None:
        return ""
    return f"{row['peak_mem_mb']:.0f} (+{row['added_mem_mb']:.0f})"


def _speedup(row: dict, baseline: str) -> str:
    value = row.get("speedup", {}).get(baseline)
    return "" if value is None else f"{value:.2f}x"


COLUMNS = ("backend", "precision", "shape", "p50 ms", "p10-p90 ms", "slices/s", "CPU ms", "peak MB (+call)", "cold s",
           "rel L2", "vs official fp32", "vs eager fp32")


def cells(row: dict) -> list[str]:
    """A timed row's columns."""
    rel = _num(row["rel_l2"], ".1e")
    if row["within_tolerance"] is False:
        rel += f" (over {row['tolerance_rel_l2']:g})"
    return [row["backend"] + (f" ({row['variant']})" if row["variant"] else ""), row["precision"], row["shape"],
            f"{row['p50_ms']:.1f}", f"{row['p10_ms']:.1f}-{row['p90_ms']:.1f}", f"{row['slices_per_s']:.2f}",
            _num(row["cpu_ms_p50"], ".0f"), _memory(row), _num(row["cold_start_s"], ".1f"), rel,
            _speedup(row, "official fp32"), _speedup(row, "eager fp32")]


def not_run(rows: list[dict]) -> list[str]:
    """One line per backend, precision and reason that did not run (not one per shape)."""
    lines = {}
    for r in rows:
        if r["status"] != "ok":
            name = r["backend"] + (f" ({r['variant']})" if r["variant"] else "")
            lines.setdefault((name, r["precision"], r["status"], r["reason"]), []).append(r["shape"])
    return [f"{name} {precision}: {status}: {reason}" for (name, precision, status, reason) in lines]


def table(rows: list[dict]) -> str:
    """Fixed-width text for a terminal: the timed rows, then what did not run and why."""
    lines = [cells(r) for r in rows if r["status"] == "ok"]
    widths = [max(len(c[i]) for c in [COLUMNS, *lines]) for i in range(len(COLUMNS))]
    out = ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in [COLUMNS, *lines]]
    return "\n".join(out + [f"  not run: {line}" for line in not_run(rows)])


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    gpu = m["gpu"]
    where = (f"{gpu['name']} (driver {gpu['driver']}, CUDA {gpu['cuda']})" if gpu else
             f"{m['cpu']}, {m['usable_cores']} usable cores, {m['threads']} threads")
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    head = [f"# medir-fast bench, {m['date']}", "",
            f"- machine: {where}; {m['os']}, Python {m['python']}",
            f"- libraries: {libs}",
            f"- model: {s['model']}; task {s['task']}; tile {s['tile'] or 'none (whole inputs)'}; "
            f"warm-up {s['warmup']}, {s['rounds']} interleaved rounds, about {s['min_time']} s per row"]
    if s.get("command"):
        head.append(f"- command: `{s['command']}`")
    head += ["- times per call: p50, p10-p90; on CUDA by CUDA events, on the CPU by the wall clock (CPU ms: all "
             "threads); peak MB: the process's resident memory (CPU) or torch's allocations (CUDA) during the row's "
             "calls, + the most one call added; cold: from nothing to the first output (build included); rel L2 "
             "against eager fp32 on the same input", ""]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in report["rows"] if row["status"] == "ok"]
    skipped = not_run(report["rows"])
    if skipped:
        lines += ["", "Not run:", *(f"- {line}" for line in skipped)]
    return "\n".join(head + lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Latency per backend and shape on a log scale: a dot at the median, a whisker from p10 to
    p90; baselines in one colour, medir-fast's backends in another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in report["rows"] if r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in timed)) or ["nothing timed"]
    per_shape = [[r for r in timed if r["shape"] == s] for s in shapes]
    fig, axes = plt.subplots(len(shapes), 1, squeeze=False,
                             figsize=(8, 1.2 + 0.35 * sum(max(len(rows), 1) for rows in per_shape) + 0.8 * len(shapes)))
    colours = {"baseline": "tab:gray", "medir-fast": "tab:blue", "end-to-end": "tab:green"}
    for ax, shape, rows in zip(axes[:, 0], shapes, per_shape):
        for y, r in enumerate(rows):
            ax.errorbar([r["p50_ms"]], [y], xerr=[[r["p50_ms"] - r["p10_ms"]], [r["p90_ms"] - r["p50_ms"]]],
                        fmt="o", color=colours[r["kind"]], capsize=3)
        ax.set_yticks(range(len(rows)), [
            f"{r['backend']}{' (' + r['variant'] + ')' if r['variant'] else ''} {r['precision']}"
            + (f"\n(wrong output: rel L2 {r['rel_l2']:.1g})" if r["within_tolerance"] is False else "") for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.set_xlabel("ms per call (dot: median; whisker: p10-p90); grey: baselines, blue: medir-fast backends")
        ax.set_title(f"{shape} (BxHxW)", fontsize=10)
    machine = report["machine"]
    fig.suptitle(f"medir-fast bench, {report['settings']['model']}: "
                 f"{machine['gpu']['name'] if machine['gpu'] else machine['cpu']}, {machine['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
