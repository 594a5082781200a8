"""Checkpoints that resume exactly: written atomically, loaded without running pickled code."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import OmegaConf


class CheckpointError(RuntimeError):
    pass


def _model_fields(cfg) -> dict:
    return OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)


def save_checkpoint(path: Path, cfg, model, optimizer, scheduler, averaged, progress: dict) -> None:
    """Everything a run needs to continue bit-identically, written to a temporary file,
    flushed to disk and renamed over ``path``, so a crash mid-save leaves the old one intact."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg, model, optimizer, scheduler, averaged) -> dict:
    """Restores the objects in place and returns the saved progress (step, data position...)."""
    try:
        # weights_only: tensors and plain containers only; a pickle that runs code is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from error
    saved, current = state["model_config"], _model_fields(cfg)
    mismatched = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if mismatched:
        details = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in mismatched)
        raise CheckpointError(f"checkpoint {path} was written for another model ({details}); "
                              "use trainer.resume=never or another run directory")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if averaged is not None and state["averaged"] is not None:
        averaged.load_state_dict(state["averaged"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]
