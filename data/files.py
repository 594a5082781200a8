"""Writing a file whole, for the data caches here and the trainer's run files (``trainer.files``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable, Optional


def write_then_rename(path: str | os.PathLike, write: Callable[[IO[bytes]], None],
                      tmp: Optional[Path] = None, opener: Callable[..., IO[bytes]] = open) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, and rename it over ``path``, so a
    reader (another rank, a later run) finds the old file or the whole new one, never a part. On a
    failure the temporary file is removed and ``path`` is untouched. The temporary name is
    ``tmp``, by default ``<path>.tmp<pid>``: ranks that write the same file at once do not clash.
    ``opener`` opens it (the caller's ``open``, so that a caller's fault injection reaches here)."""
    path = Path(path)
    tmp = tmp or path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with opener(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
