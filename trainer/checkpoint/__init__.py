"""Checkpoints that resume exactly: written atomically, the last K kept, loaded without running pickled code.

    Checkpointer    when to save, and which backend: the one class the loop uses
    single_file     FileBackend: step-NNNNNN.pt files and last.pt (one process, DDP)
    sharded         ShardedBackend: DCP directories step-NNNNNN/ (FSDP)
    safe_load       weights-only loading, DCP's metadata unpickled safely, config checks
    common          names on disk, RNG states, durable writes

Layout of ``<run dir>/checkpoints/``: ``step-000123.pt`` per save (the newest ``keep`` are kept) and
``last.pt``, a hard link to (or copy of) the newest. A reader tries ``last.pt`` and then the step files,
newest first, skipping any that is truncated or corrupt, so a crash (even SIGKILL) mid-save never
leaves a run unable to resume.

FSDP runs (``trainer.parallel=fsdp``) write sharded checkpoints through torch.distributed.checkpoint
(DCP) instead: a directory ``step-000123/`` per save holding each rank's shards of the model, optimizer
and averaged model (``__R_0.distcp``, DCP's ``.metadata``), ``state.pt`` (progress, scheduler, the model
config, the optimizer's non-tensor state) and ``rng-R.pt`` (rank R's RNG states). Every rank writes into
``step-000123.tmp/``; after a barrier rank 0 renames it into place, so a save killed midway leaves no
step directory. The newest ``keep`` directories are kept; the newest whose files are all present and
complete is resumed from. Nothing is unpickled freely: ``state.pt`` and ``rng-R.pt`` load with
weights_only, DCP's ``.metadata`` with an unpickler that admits only DCP's own metadata classes, and a
checkpoint holding non-tensor DCP entries (which DCP would unpickle) is refused.

Resuming on another world size works: DCP reshards the model, optimizer and averaged-model state on
load. The data position is converted (the batches consumed so far, ``batch_index * old world size``,
divided by the new one), but batches are sharded by rank, so the data order (which batches make up each
step, and a few batches around the resume point) differs from an uninterrupted run; ranks beyond the old
world size keep their freshly seeded RNG state. With the same world size a resumed run continues exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf

from trainer.checkpoint.common import STEP_DIR, STEP_FILE, Contents, has_checkpoint, step_dirs, step_files
from trainer.checkpoint.safe_load import CheckpointError, UnsafeCheckpointError
from trainer.checkpoint.sharded import ShardedBackend, read_sharded_state
from trainer.checkpoint.single_file import FileBackend, latest_checkpoint, read_checkpoint

__all__ = ["Checkpointer", "CheckpointError", "UnsafeCheckpointError", "latest_checkpoint", "read_checkpoint",
           "read_sharded_state", "has_checkpoint", "step_files", "step_dirs", "STEP_FILE", "STEP_DIR"]


def _silent(line: str) -> None:
    pass


class Checkpointer:
    """Saves and restores one run's model, optimizer, schedule, averaged model, RNG and ``TrainState``-like
    progress under ``directory``: single files written by rank 0 (one process, DDP) or, with ``sharded``
    (FSDP), DCP directories every rank writes its shards into. It owns when to save: every ``interval``
    steps, and after ``minutes`` of wall time since the last save; with neither, whenever asked."""

    def __init__(self, directory: Path, cfg, model, optimizer, scheduler, averaged=None, *, sharded: bool = False,
                 is_main: bool = True, keep: int = 3, interval: Optional[int] = None,
                 minutes: Optional[float] = None, report: Callable[[str], None] = print):
        contents = Contents(
            model, optimizer, scheduler, averaged,
            model_config=OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True),
            optim_config=OmegaConf.to_container(cfg.optim, resolve=True, enum_to_str=True) if "optim" in cfg else {})
        backend = ShardedBackend if sharded else FileBackend
        self.backend = backend(directory, contents, keep, report if is_main else _silent)
        self.writes = sharded or is_main  # single files: rank 0 writes them; sharded: every rank its shards
        self.interval, self.minutes = interval, minutes
        self.saved_step, self.saved_time = -1, time.time()

    def due(self, step: int) -> bool:
        if self.interval is None and self.minutes is None:  # no schedule: the caller decides
            return True
        return (self.interval is not None and step % self.interval == 0) or (
            self.minutes is not None and time.time() - self.saved_time > 60 * self.minutes)

    def save(self, progress: dict, *, force: bool = False) -> bool:
        """Save at ``progress["step"]`` when a save is due (or ``force``) and that step is not saved yet;
        returns whether it saved. Sharded: every rank calls this."""
        step = progress["step"]
        if step == self.saved_step or not (force or self.due(step)):
            return False
        if self.writes:
            self.backend.save(progress)
        self.saved_step, self.saved_time = step, time.time()
        return True

    def latest(self, step: int) -> Path:
        """Where the save of ``step`` is (what a resume reads first)."""
        return self.backend.path(step)

    def load(self) -> Optional[tuple[Path, dict]]:
        """Restore the newest usable checkpoint in place: (its path, the saved progress), or None when there
        is none. Sharded: every rank calls this."""
        found = self.backend.load()
        if found is not None:
            self.saved_step = found[1]["step"]
        return found
