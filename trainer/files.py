"""Writing a run's files so that a fault (a full disk, a read-only mount, a crash) loses nothing.

Whole files are written to a temporary name, fsynced and renamed into place, and the temporary file
is removed when the write fails; an appended line is taken back when it cannot be written whole. A
failed write raises ``StorageError``, one line naming the file and what to do, and the last good
copy stays. ``RunDirLock`` keeps a second process off a run directory in use; ``NewRunDir`` notes whether
a run directory is new, so that a run refused at start can take it away again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, IO

from hydra.experimental.callback import Callback

from data.files import write_then_rename
from trainer.errors import ConfigError


class StorageError(RuntimeError):
    """A file of the run could not be written (disk full, read-only, no permission). Exit 2."""


def storage_error(path: Path, error: OSError) -> StorageError:
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        advice = "free space there (or point hydra.run.dir elsewhere) and re-run the same command to resume"
    else:
        advice = "make it writable or choose another hydra.run.dir, then re-run the same command"
    return StorageError(f"cannot write {path}: {error.strerror or error}; {advice}")


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error``, if any: torch.save, say, reports a failed write as a RuntimeError."""
    seen = set()
    while error is not None and id(error) not in seen and not isinstance(error, OSError):
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into ``path.tmp``, fsync, rename over ``path``; on failure ``path`` is untouched
    and a failed write is a StorageError. One writer per file here (rank 0, or each rank its own), so
    the temporary name is fixed and a save killed midway leaves a ``.tmp`` the next save removes."""
    try:
        # through this module's `open`, which the fault tests replace with a full disk
        write_then_rename(path, write, path.with_name(path.name + ".tmp"), opener=open)
    except BaseException as error:
        os_error = os_error_in(error)
        if os_error is not None:
            raise storage_error(path, os_error) from error
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline, or nothing at all: a part written before a failure is cut off."""
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write((line + "\n").encode())
            f.flush()
        except OSError as error:
            f.truncate(size)
            raise storage_error(path, error) from error


class RunDirLock:
    """An advisory lock (``flock``) on ``<run dir>/.lock`` for as long as the run lives. The kernel drops
    it when the process ends, however it ends, so a killed run never blocks the next one."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise storage_error(self.path, error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"run directory {self.path.parent} is in use by process {holder} (the same command "
                              "running elsewhere?); wait for it or stop it, or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class NewRunDir(Callback):
    """A Hydra callback (``hydra.callbacks`` in conf/config.yaml): before Hydra creates the run directory,
    notes the topmost folder of it that does not exist yet, which this invocation therefore creates."""

    created: Path | None = None

    def on_run_start(self, config, **kwargs) -> None:  # single runs only: a multirun job records failed.json
        missing, path = None, Path(config.hydra.run.dir).absolute()
        while not path.exists():
            missing, path = path, path.parent
        NewRunDir.created = missing


def remove_new_run_dir(run_dir: Path, job_name: str) -> None:
    """Take away ``run_dir`` (and the folders above it made with it) if this invocation created it and it holds
    only what Hydra and the lock wrote there: a typo leaves nothing behind, and another run's files stay."""
    run_dir, created = run_dir.absolute(), NewRunDir.created
    if created is None or not run_dir.is_relative_to(created):
        return
    ours = {".hydra", ".lock", f"{job_name}.log"}
    if not {p.name for p in run_dir.iterdir()} <= ours:
        return
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for name in ours - {".hydra"}:
        (run_dir / name).unlink(missing_ok=True)
    for path in [run_dir, *run_dir.parents]:
        try:
            path.rmdir()  # refuses a folder that is not empty
        except OSError:
            return
        if path == created:
            return
