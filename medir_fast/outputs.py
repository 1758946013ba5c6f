"""The files one run writes: checked before any work, written as temporaries, committed together.

A medical image with one wrong voxel is worse than none, and so is a half-written file or a
preview written over a scan. `Outputs` therefore checks every target path before the
computation starts, hands out temporary files beside the targets, and renames them into place
together at the end (all or none). SIGINT, SIGTERM and SIGHUP become `Interrupted` under
`signals_raise_interrupted()`, so the same cleanup runs for a signal as for an error; a signal
that arrives while the files are being renamed is held until they are all in place.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS}  # file systems without them


class OutputError(ValueError):
    """An output path that cannot be written as asked; the message is meant for the user."""


class Interrupted(BaseException):
    """A run stopped by SIGINT, SIGTERM or SIGHUP (a BaseException, like KeyboardInterrupt);
    exit_code is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


_held: list[int] | None = None  # signals that arrived while files were being renamed or removed
COMMITTED: list[Path] = []  # every file this process committed, in order (what an interrupted run did write)


def _on_signal(signum, frame):
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise `Interrupted` (the command line uses it). The
    previous handlers come back afterwards. A signal ignored on entry stays ignored, as POSIX asks
    of programs that catch signals: `nohup medir-fast ...` must outlive the terminal, and a
    shell's background job ignores SIGINT. Outside the main thread, where Python cannot set
    handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in INTERRUPTING_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_signals() -> None:
    """From now on SIGINT, SIGTERM and SIGHUP do nothing (main thread): a run that is already
    stopping reports once, whatever else arrives."""
    if threading.current_thread() is threading.main_thread():
        for s in INTERRUPTING_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


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
    target, inside a folder target, a folder (unless added as one), an existing file without
    `overwrite`, or in a folder that is missing or cannot be written to.
    """

    def __init__(self, inputs: Iterable[str | Path] = (), overwrite: bool = False):
        self.inputs = [Path(p) for p in inputs]
        self.overwrite = overwrite
        self.targets: dict[Path, str] = {}  # target -> what it is ("output", "preview")
        self.pending: dict[Path, Path] = {}  # target -> its finished temporary
        self._temporaries: list[Path] = []  # every temporary made, registered before it exists
        self.folders: set[Path] = set()  # the targets that are folders

    def add(self, path: str | Path, what: str = "output", suffixes: tuple[str, ...] | None = None,
            folder: bool = False) -> Path:
        """Check a target path now, before any work; returns it as a Path. `what` names it in
        messages; `suffixes`, when given, are the endings it must have. folder=True: the target
        is a folder written whole (a DICOM series); an existing empty folder is replaced freely,
        a non-empty one only with `overwrite`, and it may neither hold an input nor lie in one."""
        path = Path(path)
        if suffixes and not path.name.lower().endswith(suffixes):
            raise OutputError(f"{what} must end in {' or '.join(suffixes)}: {path}")
        if folder:
            self._check_folder(path, what)
        elif path.is_dir():
            raise OutputError(f"{what} {path} is a folder; give a file name")
        parent = path.parent
        if not parent.is_dir():
            raise OutputError(f"{what} folder does not exist: {parent}")
        for source in self.inputs:
            if same_file(path, source) or path.absolute() == source.absolute():
                raise OutputError(f"{what} {path} is the input {source}; the input is never overwritten")
        for other, other_what in self.targets.items():
            if same_file(path, other) or path.absolute() == other.absolute():
                raise OutputError(f"{what} {path} is also the {other_what}")
            folders = [f for f, is_folder in ((path, folder), (other, other in self.folders)) if is_folder]
            if any(f.resolve() in p.resolve().parents for f in folders for p in (path, other)):
                raise OutputError(f"{what} {path} and the {other_what} {other}: a file cannot go inside the folder "
                                  "written as a whole")
        if not folder and os.path.lexists(path) and not self.overwrite:
            raise OutputError(f"{what} {path} exists; pass --overwrite to replace it")
        try:
            self._remove(self._new_temporary(path, folder=folder))
        except OSError as exc:
            raise OutputError(f"{what} folder is not writable: {parent} ({exc.strerror})") from exc
        self.targets[path] = what
        if folder:
            self.folders.add(path)
        return path

    def _check_folder(self, path: Path, what: str) -> None:
        target = path.resolve()
        for source in self.inputs:
            source = source.resolve()
            if target == source or target in source.parents:
                raise OutputError(f"{what} folder {path} holds the input {source}; the input is never overwritten")
            if source in target.parents:
                raise OutputError(f"{what} folder {path} is inside the input folder {source}; write it elsewhere")
        if os.path.lexists(path) and not path.is_dir():
            raise OutputError(f"{what} {path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not self.overwrite:
            raise OutputError(f"{what} folder {path} exists and is not empty; pass --overwrite to replace it")

    def temporary(self, target: Path) -> Path:
        """A new empty file (or folder) beside `target` (same suffix, plain-create permissions)
        that `commit` renames onto it."""
        if target not in self.targets:
            raise ValueError(f"{target} was not added as an output")
        self.pending[target] = self._new_temporary(target, folder=target in self.folders)
        return self.pending[target]

    def commit(self) -> list[Path]:
        """Put every temporary in place of its target: all of them, or (on an error) none.

        A target that did not exist is created only if it still does not (a file that appeared
        during the run is never replaced without `overwrite`). A file being replaced is first
        hard-linked aside, so its name never goes missing, and put back if a later target fails.
        Signals wait until this is done.
        """
        missing = [str(t) for t in self.targets if t not in self.pending]
        if missing:
            raise ValueError(f"no file was written for {', '.join(missing)}")
        placed: list[tuple[Path, Path | None]] = []  # (target, the file it replaced, linked aside)
        try:
            with _holding_signals():
                try:
                    for target, tmp in self.pending.items():
                        placed.append((target, self._place(target, tmp)))
                except BaseException:
                    self._roll_back(placed)
                    raise
                for _, backup in placed:
                    if backup is not None:
                        self._remove(backup)
                COMMITTED.extend(self.pending)
        finally:
            self.pending.clear()
        return list(self.targets)

    def _place(self, target: Path, tmp: Path) -> Path | None:
        """Move `tmp` onto `target`; the file it replaced, linked aside (None if there was none)."""
        what = self.targets[target]
        if target in self.folders:
            return self._place_folder(target, tmp)
        if not os.path.lexists(target):
            try:
                os.link(tmp, target)  # fails if the target appeared meanwhile, unlike a rename
            except FileExistsError:
                raise OutputError(f"{what} {target} appeared during the run; pass --overwrite to replace it") from None
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                if os.path.lexists(target):
                    raise OutputError(f"{what} {target} appeared during the run") from None
                os.replace(tmp, target)
            self._remove(tmp)
            return None
        if not self.overwrite:
            raise OutputError(f"{what} {target} appeared during the run; pass --overwrite to replace it")
        if target.is_dir():
            raise OutputError(f"{what} {target} became a folder during the run")
        backup = self._new_temporary(target, create=False)
        try:
            os.link(target, backup, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            os.replace(target, backup)  # move it aside instead
        os.replace(tmp, target)
        return backup

    def _place_folder(self, target: Path, tmp: Path) -> Path | None:
        """Rename the folder `tmp` onto `target`; a folder already there (empty, or full with
        `overwrite`) is first moved aside, so that it can be put back. A folder that appears
        meanwhile makes the rename fail."""
        what = self.targets[target]
        if os.path.lexists(target) and not target.is_dir():
            raise OutputError(f"{what} {target} became a file during the run")
        backup = None
        if target.is_dir():
            if any(target.iterdir()) and not self.overwrite:
                raise OutputError(f"{what} folder {target} filled during the run; pass --overwrite to replace it")
            backup = self._new_temporary(target, create=False, folder=True)
            os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if backup is not None:
                self._temporaries.remove(backup)  # never deleted: until it is back, it is the only copy
                try:
                    os.replace(backup, target)
                except OSError:
                    raise OutputError(f"could not put back the folder being replaced: {target} is at {backup}") from exc
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"{what} folder {target} filled during the run; pass --overwrite to replace it") from None
            if exc.errno == errno.ENOTDIR:
                raise OutputError(f"{what} {target} or a folder above it is no longer a folder") from None
            raise
        self._temporaries.remove(tmp)
        return backup

    def _roll_back(self, placed: list[tuple[Path, Path | None]]) -> None:
        """Undo `_place` for every target; a file that cannot be put back keeps its backup, named."""
        stranded = []
        for target, backup in reversed(placed):
            try:
                if target in self.folders:
                    shutil.rmtree(target, ignore_errors=True)
                elif backup is None:
                    target.unlink(missing_ok=True)
                if backup is not None:
                    os.replace(backup, target)
                    self._temporaries.remove(backup)
            except OSError:
                if backup is not None:
                    self._temporaries.remove(backup)  # never deleted: it is the only copy
                    stranded.append(f"{target} is at {backup}")
        if stranded:
            raise OutputError(f"could not put back the files being replaced: {'; '.join(stranded)}")

    def discard(self) -> None:
        """Remove every temporary still on disk (again if a signal cut the first pass short)."""
        try:
            with _holding_signals():
                self._remove_all()
        finally:
            self._remove_all()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def _new_temporary(self, target: Path, create: bool = True, folder: bool = False) -> Path:
        name = target.name
        suffix = "" if folder else name[-7:] if name.lower().endswith(".nii.gz") else target.suffix  # what writers go by
        tmp = target.with_name(f".{name[: len(name) - len(suffix)]}.{secrets.token_hex(4)}.partial{suffix}")
        self._temporaries.append(tmp)  # before it exists: a signal can never orphan it
        if create and folder:
            os.mkdir(tmp, 0o777)
        elif create:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return tmp

    def _remove(self, tmp: Path) -> None:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
        if tmp in self._temporaries:
            self._temporaries.remove(tmp)

    def _remove_all(self) -> None:
        for tmp in list(self._temporaries):
            self._remove(tmp)


def write_atomically(path: str | Path, write: Callable[[Path], object], what: str = "output",
                     overwrite: bool = True) -> Path:
    """One file, whole or not at all: `write(temporary)`, then renamed onto `path`."""
    with Outputs(overwrite=overwrite) as outputs:
        target = outputs.add(path, what)
        write(outputs.temporary(target))
        outputs.commit()
    return target
