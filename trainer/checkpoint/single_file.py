"""Single-file checkpoints (one process, DDP: rank 0 writes): ``step-NNNNNN.pt`` per save, the newest
``keep`` kept, and ``last.pt`` a hard link to (or copy of) the newest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from trainer.checkpoint.common import (Contents, restore_rng, rng_state, save_file, step_dirs, step_files,
                                       sync_dir)
from trainer.checkpoint.safe_load import (CheckpointError, UnsafeCheckpointError, check_model_config,
                                          check_optim_config, load_weights_only)
from trainer.files import storage_error


def read_checkpoint(path: Path) -> dict:
    """The saved state, or a CheckpointError: unreadable/corrupt, or holding more than tensors and
    plain containers (weights_only: a pickle that would run code is refused, never executed)."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or not {"model", "progress", "model_config"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this repository")
    return state


def latest_checkpoint(checkpoint_dir: Path, report=print) -> tuple[Path, dict] | None:
    """The newest readable checkpoint, reporting (one line each) any newer one that is corrupt.
    None when there is none; a CheckpointError when some exist but none is readable, or one is unsafe."""
    candidates = [checkpoint_dir / "last.pt"] if (checkpoint_dir / "last.pt").exists() else []
    candidates += step_files(checkpoint_dir)
    problems = []
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            report(f"warning: skipping {error}")
            problems.append(path.name)
    if problems:
        raise CheckpointError(f"no readable checkpoint in {checkpoint_dir} (tried {', '.join(problems)}); "
                              "use trainer.resume=never or another run directory")
    if step_dirs(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} holds only sharded checkpoints (step-NNNNNN/ directories) of an "
                              "FSDP run: resume with trainer.parallel=fsdp under torchrun, or use trainer.resume=never")
    return None


class FileBackend:
    """Saves and restores ``contents`` as single files under ``directory``."""

    def __init__(self, directory: Path, contents: Contents, keep: int, report: Callable[[str], None]):
        self.directory, self.contents, self.keep, self.report = directory, contents, keep, report

    def path(self, step: int) -> Path:
        return self.directory / "last.pt"

    def save(self, progress: dict) -> Path:
        """``step-NNNNNN.pt`` (temporary file, fsync, rename) and ``last.pt`` (link renamed into place); step
        files beyond the newest ``keep`` are removed. Refuses non-finite parameters, so a diverged state
        never replaces a good checkpoint."""
        c = self.contents
        for name, tensor in c.model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"refusing to checkpoint step {progress['step']}: parameter {name} is not finite")
        state = {
            "model": c.model.state_dict(),
            "optimizer": c.optimizer.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "averaged": c.averaged.state_dict() if c.averaged is not None else None,
            "progress": dict(progress),
            "rng": rng_state(),
            "model_config": c.model_config,
            "optim_config": c.optim_config,
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error(self.directory, error) from error
        for stale in self.directory.glob("step-*.pt.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        path = self.directory / f"step-{progress['step']:06d}.pt"
        save_file(state, path)
        last, link = self.directory / "last.pt", self.directory / "last.pt.tmp"
        link.unlink(missing_ok=True)
        try:
            try:
                os.link(path, link)
            except OSError:  # file systems without hard links
                shutil.copyfile(path, link)
            os.replace(link, last)
        except OSError as error:  # the step file is complete: a resume finds it without last.pt
            link.unlink(missing_ok=True)
            raise storage_error(last, error) from error
        for old in step_files(self.directory)[max(self.keep, 1):]:
            old.unlink(missing_ok=True)
        sync_dir(self.directory)
        return path

    def load(self) -> Optional[tuple[Path, dict]]:
        found = latest_checkpoint(self.directory, report=self.report)
        if found is None:
            return None
        path, state = found
        self.restore(state, path)
        return path, state["progress"]

    def restore(self, state: dict, path: Path) -> None:
        """Restore a single-file checkpoint's ``state`` (from ``read_checkpoint(path)``) in place."""
        c = self.contents
        check_model_config(state["model_config"], path, c.model_config)
        check_optim_config(state.get("optim_config"), path, c.optim_config,
                           state["optimizer"]["param_groups"], c.optimizer.state_dict()["param_groups"])
        try:
            c.model.load_state_dict(state["model"])
            c.optimizer.load_state_dict(state["optimizer"])
            c.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({first_line})") from error
        if c.averaged is not None and state["averaged"] is not None:
            c.averaged.load_state_dict(state["averaged"])
        restore_rng(state["rng"])
