"""The files one run writes: checked before any work, written as temporaries, committed together.

A medical image with one wrong voxel is worse than none, and so is a half-written file or a
preview written over a scan. `Outputs` therefore checks every target path before the
computation starts, hands out temporary files beside the targets, and renames them into place
together at the end (all or none). SIGINT, SIGTERM and SIGHUP become `Interrupted` under
`signals_raise_interrupted()`, so the same cleanup runs for a signal as for an error; a signal
that arrives while the files are being renamed is held until they are all in place.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class OutputError(ValueError):
    """An output path that cannot be written as asked; the message is meant for the user."""


class Interrupted(BaseException):
    """A run stopped by SIGINT, SIGTERM or SIGHUP (a BaseException, like KeyboardInterrupt).

    exit_code is the shell's 128 + signal number; `written` lists the outputs that were already
    complete when the signal came (it arrived while they were being committed), else it is empty.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.written: list[Path] = []


_held: list[int] | None = None  # signals that arrived while files were being renamed or removed


def _on_signal(signum, frame):
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise `Interrupted` (the command line uses it). The
    previous handlers come back afterwards. Outside the main thread, where Python cannot set
    handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in INTERRUPTING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _holding_signals() -> Iterator[list[int]]:
    """Signals arriving within are raised only when it ends, so renames are never cut halfway."""
    global _held
    if _held is not None:  # already holding
        yield _held
        return
    _held = []
    try:
        yield _held
    finally:
        held, _held = _held, None
        if held:
            raise Interrupted(held[0])


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, through symlinks and hard links."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Outputs:
    """The output files of one run, written all or none.

        with Outputs(inputs=[input_path], overwrite=False) as outputs:
            out = outputs.add("restored.nii.gz", "output", (".nii", ".nii.gz"))  # checked now
            ... the long computation ...
            write(outputs.temporary(out))
            outputs.commit()          # every temporary renamed onto its target, or none
        # leaving the block by an error or a signal removes every temporary

    A target is refused when it is an input (also through a symlink or hard link), another
    target, a folder, an existing file without `overwrite`, or in a folder that is missing or
    cannot be written to.
    """

    def __init__(self, inputs: Iterable[str | Path] = (), overwrite: bool = False):
        self.inputs = [Path(p) for p in inputs]
        self.overwrite = overwrite
        self.targets: dict[Path, str] = {}  # target -> what it is ("output", "preview")
        self.pending: dict[Path, Path] = {}  # target -> its finished temporary
        self._temporaries: list[Path] = []  # every temporary made, registered before it exists

    def add(self, path: str | Path, what: str = "output", suffixes: tuple[str, ...] | None = None) -> Path:
        """Check a target path now, before any work; returns it as a Path. `what` names it in
        messages; `suffixes`, when given, are the endings it must have."""
        path = Path(path)
        if suffixes and not path.name.lower().endswith(suffixes):
            raise OutputError(f"{what} must end in {' or '.join(suffixes)}: {path}")
        if path.is_dir():
            raise OutputError(f"{what} {path} is a folder; give a file name")
        folder = path.parent
        if not folder.is_dir():
            raise OutputError(f"{what} folder does not exist: {folder}")
        for source in self.inputs:
            if same_file(path, source) or path.absolute() == source.absolute():
                raise OutputError(f"{what} {path} is the input {source}; the input is never overwritten")
        for other, other_what in self.targets.items():
            if same_file(path, other) or path.absolute() == other.absolute():
                raise OutputError(f"{what} {path} is also the {other_what}")
        if os.path.lexists(path) and not self.overwrite:
            raise OutputError(f"{what} {path} exists; pass --overwrite to replace it")
        try:
            self._remove(self._new_temporary(path))
        except OSError as exc:
            raise OutputError(f"{what} folder is not writable: {folder} ({exc.strerror})") from exc
        self.targets[path] = what
        return path

    def temporary(self, target: Path) -> Path:
        """A new empty file beside `target` (same suffix, plain-create permissions) that `commit`
        renames onto it."""
        if target not in self.targets:
            raise ValueError(f"{target} was not added as an output")
        self.pending[target] = self._new_temporary(target)
        return self.pending[target]

    def commit(self) -> list[Path]:
        """Rename every temporary onto its target: all of them, or (on an error) none, with any
        file they were replacing put back. Signals wait until this is done."""
        missing = [str(t) for t in self.targets if t not in self.pending]
        if missing:
            raise ValueError(f"no file was written for {', '.join(missing)}")
        placed: list[tuple[Path, Path | None]] = []  # (target, the file it replaced, moved aside)
        try:
            with _holding_signals():
                try:
                    for target, tmp in self.pending.items():
                        backup = None
                        if os.path.lexists(target):
                            backup = self._new_temporary(target, create=False)
                            os.replace(target, backup)
                        placed.append((target, backup))
                        os.replace(tmp, target)
                except BaseException:
                    for target, backup in reversed(placed):
                        if backup is not None:
                            os.replace(backup, target)
                        else:  # there was no file: remove ours
                            target.unlink(missing_ok=True)
                    placed.clear()
                    raise
                for _, backup in placed:
                    if backup is not None:
                        self._remove(backup)
        except Interrupted as exc:  # it came during the renames, which were all completed
            exc.written = [t for t, _ in placed]
            raise
        finally:
            self.pending.clear()
        return list(self.targets)

    def discard(self) -> None:
        """Remove every temporary still on disk."""
        with _holding_signals():
            for tmp in list(self._temporaries):
                self._remove(tmp)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def _new_temporary(self, target: Path, create: bool = True) -> Path:
        suffix = ".nii.gz" if target.name.lower().endswith(".nii.gz") else target.suffix  # what writers go by
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial{suffix}")
        self._temporaries.append(tmp)  # before it exists: a signal can never orphan it
        if create:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return tmp

    def _remove(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        if tmp in self._temporaries:
            self._temporaries.remove(tmp)


def write_atomically(path: str | Path, write: Callable[[Path], object], what: str = "output",
                     overwrite: bool = True) -> Path:
    """One file, whole or not at all: `write(temporary)`, then renamed onto `path`."""
    with Outputs(overwrite=overwrite) as outputs:
        target = outputs.add(path, what)
        write(outputs.temporary(target))
        outputs.commit()
    return target
