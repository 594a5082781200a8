"""Checkpoints that resume exactly: written atomically, the last K kept, loaded without running pickled code.

Layout of ``<run dir>/checkpoints/``: ``step-000123.pt`` per save (the newest ``keep`` are kept) and
``last.pt``, a hard link to (or copy of) the newest. A reader tries ``last.pt`` and then the step files,
newest first, skipping any that is truncated or corrupt, so a crash (even SIGKILL) mid-save never
leaves a run unable to resume.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when unpickled: never skipped silently."""


def _model_fields(cfg) -> dict:
    return OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)


def _atomic_write(state: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the renames themselves durable
    finally:
        os.close(fd)


def step_files(checkpoint_dir: Path) -> list[Path]:
    """``step-*.pt`` files, newest (highest step) first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(checkpoint_dir: Path, cfg, model, optimizer, scheduler, averaged, progress: dict,
                    keep: int = 3) -> Path:
    """Everything a run needs to continue bit-identically, as ``step-NNNNNN.pt`` (temporary file, fsync,
    rename) and ``last.pt`` (link renamed into place); step files beyond the newest ``keep`` are removed.
    Refuses to write non-finite parameters, so a diverged state never replaces a good checkpoint."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to checkpoint step {progress['step']}: parameter {name} is not finite")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "averaged": averaged.state_dict() if averaged is not None else None,
        "progress": dict(progress),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "model_config": _model_fields(cfg),
    }
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / f"step-{progress['step']:06d}.pt"
    _atomic_write(state, path)
    last, link = checkpoint_dir / "last.pt", checkpoint_dir / "last.pt.tmp"
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, link)
    os.replace(link, last)
    for old in step_files(checkpoint_dir)[max(keep, 1):]:
        old.unlink(missing_ok=True)
    _sync_dir(checkpoint_dir)
    return path


def read_checkpoint(path: Path) -> dict:
    """The saved state, or a CheckpointError: unreadable/corrupt, or holding more than tensors and
    plain containers (weights_only: a pickle that would run code is refused, never executed)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "allowed global" in str(error) or "Unsupported global" in str(error):  # not mere corruption
            raise UnsafeCheckpointError(f"refusing checkpoint {path}: it holds objects other than tensors and "
                                        f"plain containers, which could run code when loaded ({first_line})") from error
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line})") from error
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
    return None


def restore_checkpoint(state: dict, path: Path, cfg, model, optimizer, scheduler, averaged) -> dict:
    """Restores the objects in place and returns the saved progress (step, data position...)."""
    saved, current = state["model_config"], _model_fields(cfg)
    mismatched = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if mismatched:
        details = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in mismatched)
        raise CheckpointError(f"checkpoint {path} was written for another model ({details}); "
                              "use trainer.resume=never or another run directory")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({first_line})") from error
    if averaged is not None and state["averaged"] is not None:
        averaged.load_state_dict(state["averaged"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]


def load_checkpoint(path: Path, cfg, model, optimizer, scheduler, averaged) -> dict:
    """One named checkpoint file: read safely and restored in place; returns the saved progress."""
    return restore_checkpoint(read_checkpoint(path), path, cfg, model, optimizer, scheduler, averaged)
