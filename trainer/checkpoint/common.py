"""What both backends share: the names of the saves on disk, the RNG states saved with each, and
making renames durable."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from trainer.files import atomic_write

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")  # single files (one process, DDP)
STEP_DIR = re.compile(r"^step-(\d+)$")  # FSDP: one DCP directory per save


def sync_dir(directory: Path) -> None:
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


def has_checkpoint(checkpoint_dir: Path) -> bool:
    """Whether a resume would find something to load (or to refuse) in ``checkpoint_dir``, either backend's."""
    return (checkpoint_dir / "last.pt").exists() or bool(step_files(checkpoint_dir) or step_dirs(checkpoint_dir))


def step_dirs(checkpoint_dir: Path) -> list[Path]:
    """``step-*/`` checkpoint directories, newest (highest step) first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def save_file(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` written whole (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


class Contents(NamedTuple):
    """What a checkpoint holds besides the progress: the live objects it saves from and restores into,
    and the configs a resume must match."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # a torch.optim.lr_scheduler
    averaged: Optional[torch.nn.Module]  # the Polyak-averaged copy, if the run keeps one
    model_config: dict
    optim_config: dict
