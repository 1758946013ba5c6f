"""`medir-fast bench`: AMIR's latency against baselines, every backend, in one run.

`bench()` times, on the same weights and the same inputs, in one process: the baselines (the
official algorithm in eager PyTorch, fp32 or under autocast; the same under `torch.compile`;
BM3D for the denoising tasks) and every medir-fast backend on the device, in interleaved rounds
(`timing.py`). Each row records its latency percentiles, throughput, peak memory, the time to its
first output (the build separately), its error against eager fp32 on the same input with the
tolerance that applies, and its speed-up against each baseline of the run. A backend that cannot
run here is a row with the reason; nothing falls back silently.

    report = medir_fast.bench.bench(config="slim", shapes=["1x256x256"], device="cpu")
    report["rows"][0]["p50_ms"]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..restorer import PRECISIONS, Restorer, check_tile, resolve_device
from .candidates import ALL, BASELINES, CLASSICAL, NETWORK_BASELINES, build, skip_reason, unavailable
from .timing import ROUNDS, Clock, Timed, interleaved

log = logging.getLogger("medir_fast")

# What runs without options: on a 2-core CPU all of it in under 5 minutes, a first ONNX export included.
DEFAULTS = {
    "cpu": dict(shapes="1x256x256,4x128x128", precisions="fp32", min_time=4.0,
                left_out={"compile": "its build takes a minute or more per shape on a CPU, where torch 2.13's inductor "
                                     "computes the official routing wrongly (benchmarks/RESULTS.md); --backends all runs it",
                          "aoti": "its build takes minutes on a CPU; --backends all runs it"}),
    "cuda": dict(shapes="1x512x512,8x256x256", precisions="fp32,bf16", min_time=4.0, left_out={}),
}
# rel L2 against eager fp32 on the same input that each precision must stay within
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
SEED = 0


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'1x512x512,8x256x256' -> [(1, 512, 512), (8, 256, 256)]: batch >= 1, sides multiples of 8 and >= 16."""
    shapes = []
    for part in text.split(","):
        try:
            b, h, w = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {part!r} is not BxHxW (e.g. 1x512x512)") from None
        if b < 1 or min(h, w) < 16 or h % 8 or w % 8:
            raise ValueError(f"shape {part!r}: batch >= 1, height and width multiples of 8 and >= 16")
        shapes.append((b, h, w))
    return shapes


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def bench_model(weights: str | None, config: str | dict | None) -> tuple[torch.nn.Module, str]:
    """The model to time and how to name it: shipped or given weights, or random weights (every
    parameter perturbed so that no branch is inert) for a configuration ('default' or AMIR
    arguments as a dict or JSON)."""
    from ..api import load_model
    from ..model import AMIR, DEFAULT_CONFIG

    if weights is not None and config is not None:
        raise ValueError("give --config or --weights, not both (weights carry their configuration)")
    if config in (None, "slim") or weights is not None:
        name = weights or "slim"
        return load_model(name), f"weights {name}"
    if config != "default" and isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config: 'slim', 'default' or a JSON object of AMIR arguments ({exc})") from None
    if config != "default" and not isinstance(config, dict):
        raise ValueError(f"--config: 'slim', 'default' or a JSON object of AMIR arguments, not {config!r}")
    arguments = {**DEFAULT_CONFIG, **({} if config == "default" else config)}
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random state is left alone
        torch.manual_seed(SEED)
        try:
            model = AMIR(**arguments)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"--config: {exc}") from None
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
            if pname.endswith("temperature"):
                p.abs_()
    return model.eval(), f"config {'default' if config == 'default' else json.dumps(config)}, random weights"


@contextlib.contextmanager
def _quiet_and_exact(device: torch.device):
    """Library info logs off while timing (they would land in the timed calls); TF32 off, so
    that fp32 rows compute in fp32."""
    level = log.level
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    log.setLevel(logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        log.setLevel(level)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _error_line(exc: BaseException) -> str:
    from ..errors import first_line

    return f"{type(exc).__name__}: {first_line(exc)}"


def bench(weights: str | None = None, config: str | dict | None = None, backends: str | list[str] | None = None,
          shapes: str | None = None, precisions: str | list[str] | None = None, device: str = "auto",
          tile: int = 0, warmup: int = 1, min_time: float | None = None, task: str = "ct_denoise",
          end_to_end: str | Path | None = None, progress: bool = False, echo=None) -> dict:
    """Time every backend and baseline; returns {"machine", "settings", "rows"} (see the README).

    weights/config: what to time (default: the shipped `slim` weights). backends: names of
    candidates.ALL or 'all' (default: all but the builds too slow for the device, see DEFAULTS).
    shapes: 'BxHxW,...' of network inputs; precisions: 'fp32,bf16,...'; tile: N runs each network
    row through the Restorer's N x N tiles (0: whole inputs). warmup: untimed calls per row;
    min_time: seconds each row is timed for, over the interleaved rounds (at least one call per
    round). end_to_end: a NIfTI volume also restored file to file, with and without the
    streaming runtime, in tiles and whole. echo: a function given each shape's table as it is done.
    """
    from ..tasks import TASKS

    dev = resolve_device(device)
    defaults = DEFAULTS[dev.type]
    if backends is None or backends == "all":
        names = list(ALL)
    else:
        names = parse_list(backends if isinstance(backends, str) else ",".join(backends), ALL, "backend")
    left_out = defaults["left_out"] if backends is None else {}
    shape_list = parse_shapes(shapes or defaults["shapes"])
    precisions = precisions or defaults["precisions"]
    precision_list = parse_list(precisions if isinstance(precisions, str) else ",".join(precisions), PRECISIONS,
                                "precision")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if tile:
        check_tile(tile)
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    min_time = defaults["min_time"] if min_time is None else min_time
    if min_time < 0:
        raise ValueError(f"--min-time must be >= 0, got {min_time}")
    if end_to_end is not None:
        from ..io import read_volume

        volume = read_volume(end_to_end)  # checked before anything is timed
    model, model_name = bench_model(weights, config)

    from .report import machine, table

    report = dict(machine=machine(dev), settings=dict(
        model=model_name, config=model.config, task=task, device=str(dev), shapes=[f"{b}x{h}x{w}" for b, h, w in shape_list],
        precisions=precision_list, backends=names, tile=tile, warmup=warmup, min_time=min_time, rounds=ROUNDS,
        tolerance_rel_l2=TOLERANCE, input=f"uniform random in [0, 1], seed {SEED}"), rows=[])
    built: dict[tuple[str, str], Built] = {}
    with _quiet_and_exact(dev):
        for b, h, w in shape_list:
            x = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(SEED)).to(dev)
            rows = _shape_rows(names, left_out, precision_list, model, dev, task, tile, x, built, warmup, min_time,
                               progress)
            report["rows"] += rows
            if echo is not None:
                echo(table(rows))
        if end_to_end is not None:
            rows = _end_to_end_rows(Path(end_to_end), volume, model, dev, task, precision_list[0], tile, warmup,
                                    min_time, progress)
            report["rows"] += rows
            if echo is not None:
                echo(table(rows))
    return report


@dataclasses.dataclass
class Built:
    """A candidate built once per backend and precision, or why it could not be."""

    call: object = None
    setup_s: float | None = None
    engine: str | None = None  # the engine file an engine backend runs
    engine_built: bool | None = None  # built in this run (else loaded from the cache)
    status: str = "ok"
    reason: str | None = None


def _build(name, model, dev, precision, tile, task, batch) -> Built:
    started, start = time.time(), time.perf_counter()
    try:
        call, backend = build(name, model, dev, precision, tile, task, batch)
    except Exception as exc:  # recorded in the row; the run goes on
        return Built(status="skipped" if unavailable(exc) else "failed", reason=_error_line(exc))
    engine = getattr(backend, "engine", None)
    return Built(call, time.perf_counter() - start, None if engine is None else str(engine),
                 None if engine is None else Path(engine).stat().st_mtime >= started - 1)


def _row(name: str, shape: str, precision: str, device: torch.device, tile: int) -> dict:
    kind = "baseline" if name in (*NETWORK_BASELINES, *CLASSICAL) else "medir-fast"
    return dict(backend=name, kind=kind, variant=None, device="cpu" if name in CLASSICAL else str(device),
                shape=shape, precision=precision, tile=None if name in CLASSICAL else (tile or None),
                status="ok", reason=None, calls=0, p10_ms=None, p50_ms=None, p90_ms=None, p99_ms=None,
                cpu_ms_p50=None, slices_per_s=None, peak_mem_mb=None, added_mem_mb=None, cold_start_s=None,
                setup_s=None, first_call_s=None, build_s=None, engine=None, engine_built=None, rel_l2=None,
                max_abs=None, tolerance_rel_l2=None, within_tolerance=None, speedup={})


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row-round", leave=False, dynamic_ncols=True, file=sys.stderr)


def _shape_rows(names, left_out, precisions, model, dev, task, tile, x, built, warmup, min_time, progress):
    b, _, h, w = x.shape
    shape = f"{b}x{h}x{w}"
    rows, timed, outputs = {}, {}, {}
    on_device, on_cpu = Timed(None, x, Clock(dev)), Timed(None, x.cpu(), Clock(torch.device("cpu")))
    for name in names:
        for precision in (["fp64"] if name in CLASSICAL else precisions):
            key = f"{name} {precision}"
            row = rows[key] = _row(name, shape, precision, dev, tile)
            reason = left_out.get(name) or skip_reason(name, model, dev, precision, task)
            if reason is not None:
                row.update(status="skipped", reason=reason)
                continue
            if (name, precision) not in built:
                if progress:  # an engine export or compilation can take minutes: say what is going on
                    print(f"medir-fast bench: building {key}", file=sys.stderr, flush=True)
                built[name, precision] = _build(name, model, dev, precision, tile, task, b)
            done = built[name, precision]
            if done.call is None:
                row.update(status=done.status, reason=done.reason)
                continue
            # a classical baseline runs on the CPU: timed there, on its own input copy
            target = dataclasses.replace(on_cpu if name in CLASSICAL else on_device, call=done.call)
            try:
                out, first = target.clock.first_call(target.call, target.x)
            except Exception as exc:
                row.update(status="failed", reason=_error_line(exc))
                continue
            row.update(setup_s=done.setup_s, first_call_s=first, cold_start_s=done.setup_s + first, engine=done.engine,
                       engine_built=done.engine_built)
            timed[key], outputs[key] = target, out.float().cpu()

    reference = outputs.get("eager fp32")
    if reference is None and any(r["backend"] not in CLASSICAL for r in rows.values() if r["status"] == "ok"):
        try:  # eager fp32 not among the rows: computed, untimed
            reference = build("eager", model, dev, "fp32", tile, task, b)[0](x).float().cpu()
        except Exception as exc:
            reference = None
            log.warning("bench: no eager fp32 reference (%s); errors not measured", _error_line(exc))

    for key in _time_rows(rows, timed, warmup, min_time, progress, shape, b):
        row = rows[key]
        if row["backend"] not in CLASSICAL and reference is not None:
            diff = outputs[key] - reference
            row["rel_l2"] = (diff.norm() / reference.norm()).item()
            row["max_abs"] = diff.abs().max().item()
            row["tolerance_rel_l2"] = TOLERANCE[row["precision"]]
            row["within_tolerance"] = row["rel_l2"] <= row["tolerance_rel_l2"]
    _speedups(list(rows.values()))
    return list(rows.values())


def _time_rows(rows: dict[str, dict], timed: dict[str, Timed], warmup: int, min_time: float, progress: bool,
               desc: str, slices: int) -> list[str]:
    """Time each of `timed` in interleaved rounds into its row (a progress bar on a terminal);
    returns the keys of the rows that ran to the end (a failure is recorded in its row)."""
    bar = _bar(progress, ROUNDS * len(timed), desc)
    timings = interleaved(timed, warmup, min_time,
                          progress=(lambda key: (bar.set_postfix_str(key, refresh=False), bar.update())) if bar else None,
                          failed=lambda key, exc: rows[key].update(status="failed", reason=_error_line(exc)))
    if bar is not None:
        bar.close()
    for key, timing in timings.items():
        row = rows[key]
        row.update(timing.summary())
        row["slices_per_s"] = slices / (row["p50_ms"] / 1e3)
        row["build_s"] = max(0.0, row["cold_start_s"] - row["p50_ms"] / 1e3)
    return list(timings)


def _speedups(rows: list[dict]) -> None:
    """Each timed row against every timed baseline row of the same shape: baseline p50 / row p50.
    A baseline whose output is out of tolerance computes something else: no speed-up against it."""
    baselines = [r for r in rows if r["backend"] in BASELINES and r["status"] == "ok" and r["p50_ms"]
                 and r["within_tolerance"] is not False]
    for row in rows:
        if row["status"] == "ok" and row["p50_ms"]:
            row["speedup"] = {f"{r['backend']} {r['precision']}": r["p50_ms"] / row["p50_ms"]
                              for r in baselines if r is not row}


def _end_to_end_rows(path: Path, volume, model, dev, task, precision, tile, warmup, min_time, progress) -> list[dict]:
    """`medir-fast infer`'s work on a real file (read, restore, check, write), with and without the
    streaming runtime, in tiles and on whole slices, with the backend `auto` picks; each call
    builds its Restorer afresh, as each `infer` does."""
    from ..api import restore_file

    axis = volume.slice_axis()
    dims = [n for i, n in enumerate(volume.shape[:3]) if i != axis]
    slices = volume.shape[axis]
    shape = f"{slices}x{dims[0]}x{dims[1]}"
    tiled = tile or getattr(model, "default_tiles", {}).get(task)
    if progress:
        print("medir-fast bench: building the backend auto picks, for end-to-end rows", file=sys.stderr, flush=True)
    try:
        backend = Restorer(model, task, device=dev, precision=precision).backend.name  # what infer's auto picks
    except Exception as exc:
        row = _row("end-to-end", shape, precision, dev, 0)
        row.update(kind="end-to-end", status="failed", reason=_error_line(exc))
        return [row]
    rows, timed = {}, {}
    clock = Clock(dev)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "restored.nii.gz"
        for stream in (False, True):
            for t in (tiled, 0):
                variant = f"{backend}, {'stream' if stream else 'no stream'}, {f'tile {t}' if t else 'whole slices'}"
                row = rows[variant] = _row("end-to-end", shape, precision, dev, t)
                row.update(kind="end-to-end", variant=variant, tile=t or None)
                if t is None:
                    row.update(status="skipped", reason=f"no tile: give --tile (these weights have none for {task})")
                    continue

                def call(_, stream=stream, t=t):
                    restore_file(path, out, task, model=model, overwrite=True, stream=stream, tile=t, device=dev,
                                 precision=precision, backend=backend)

                try:
                    _, first = clock.first_call(call, None)
                except Exception as exc:
                    row.update(status="failed", reason=_error_line(exc))
                    continue
                row.update(first_call_s=first, cold_start_s=first)
                timed[variant] = Timed(call, None, clock)
        _time_rows(rows, timed, warmup, min_time, progress, f"end to end {path.name}", slices)
    return list(rows.values())


# ---------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..tasks import TASKS

    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    p.add_argument("--config", default=None,
                   help="slim (the shipped weights), default (the paper's configuration, random weights) or a JSON "
                        "object of AMIR arguments (random weights); default: slim")
    p.add_argument("--weights", default=None, help="a shipped model name or a checkpoint file instead of --config")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, from: {', '.join(ALL)}; or all (default: all, except on the CPU "
                        f"{', '.join(cpu['left_out'])}, whose builds take minutes there)")
    p.add_argument("--shapes", default=None, metavar="BxHxW,...",
                   help=f"network inputs (default: {cpu['shapes']} on the CPU, {cuda['shapes']} on CUDA)")
    p.add_argument("--precision", default=None, metavar="LIST",
                   help=f"comma-separated, from: {', '.join(PRECISIONS)} (default: {cpu['precisions']} on the CPU, "
                        f"{cuda['precisions']} on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tile", type=int, default=0,
                   help="run the network rows in NxN overlapping tiles, as infer --tile does (0: whole inputs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per row after its first")
    p.add_argument("--min-time", type=float, default=None, metavar="S",
                   help=f"seconds each row is timed for, over {ROUNDS} interleaved rounds, at least one call per "
                        f"round (default: {cpu['min_time']:g})")
    p.add_argument("--task", default="ct_denoise", choices=list(TASKS),
                   help="which classical baseline applies (BM3D for ct_denoise and pet_synthesis); the task of "
                        "--end-to-end")
    p.add_argument("--end-to-end", metavar="NIFTI", default=None,
                   help="also time infer on this volume, file to file: with and without --stream, tiles on and off")
    p.add_argument("--json", metavar="FILE", default=None, help="write every row and the machine as JSON")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write the table as Markdown")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a plot: latency per backend and shape, p10-p90")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json, --markdown, --plot files")


def run(args: argparse.Namespace) -> int:
    """Outputs and options are checked before anything is timed; the files are written together
    at the end, or none of them."""
    from ..outputs import Outputs
    from .report import markdown, plot

    if args.plot:  # a missing plotting library is found before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib (pip install 'medir-fast[bench]')") from None
    inputs = [args.end_to_end] if args.end_to_end else []
    with Outputs(inputs, overwrite=args.overwrite) as outputs:
        targets = {kind: outputs.add(path, what, suffixes) for kind, path, what, suffixes in (
            ("json", args.json, "JSON", (".json",)), ("markdown", args.markdown, "Markdown", (".md",)),
            ("plot", args.plot, "plot", (".png",))) if path}
        report = bench(weights=args.weights, config=args.config, backends=args.backends, shapes=args.shapes,
                       precisions=args.precision, device=args.device, tile=args.tile, warmup=args.warmup,
                       min_time=args.min_time, task=args.task, end_to_end=args.end_to_end,
                       progress=sys.stderr.isatty(), echo=print)
        report["settings"]["command"] = shlex.join(["medir-fast", *args.argv])
        if "json" in targets:
            outputs.temporary(targets["json"]).write_text(json.dumps(report, indent=1) + "\n")
        if "markdown" in targets:
            outputs.temporary(targets["markdown"]).write_text(markdown(report))
        if "plot" in targets:
            plot(report, outputs.temporary(targets["plot"]))
        for path in outputs.commit():
            print(f"wrote {path}")
    return 0
