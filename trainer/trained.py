"""Using a trained run: its checkpoint read safely, its weights (Polyak-averaged or last iterate), its model.

    read_trained   a run directory (or its checkpoints/, or one checkpoint file) -> (file, state)
    weights        the model's state dict from a checkpoint: the averaged parameters or the raw ones
    load_trained   the run's config, task (data, tokenizer) and model, ready to use: scripts/translate.py, sample.py
    loaded_line    what every loader prints: ``loaded <file> (step N, averaged parameters)``

``trainer.init_from`` (train.py) reads its weights through the first two.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from models import build_model
from trainer.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from trainer.tasks import Task, build_task


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def read_trained(path: Path, report: Callable[[str], None] = _to_stderr) -> tuple[Path, dict]:
    """(checkpoint file, its state), loaded weights-only. A directory is read as training resumes it: ``last.pt``,
    else the newest readable ``step-NNNNNN.pt`` (each skipped one reported)."""
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not directory.is_dir():
        return path, read_checkpoint(path)
    found = latest_checkpoint(directory, report=report)
    if found is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    return found


def weights(state: dict, averaged: bool) -> tuple[dict, bool]:
    """(the model's state dict, whether it is the average): the Polyak average's when ``averaged`` and the
    checkpoint has one, else the last iterate's."""
    if not averaged or state.get("averaged") is None:
        return state["model"], False
    prefix = "module."  # AveragedModel keeps the copy under `module` next to its counter
    return {k[len(prefix):]: v for k, v in state["averaged"].items() if k.startswith(prefix)}, True


def loaded_line(path: Path, step: int, parameters: str) -> str:
    return f"loaded {path} (step {step}, {parameters})"


@dataclass
class Trained:
    cfg: Any  # the run's config.yaml
    task: Task  # its data and tokenizer
    model: torch.nn.Module  # in eval mode, on the device asked for
    line: str  # loaded_line of what was loaded


def load_trained(path: Path, model_name: str, *, last_iterate: bool = False, device=torch.device("cpu"),
                 report: Callable[[str], None] = _to_stderr) -> Trained:
    """The run of ``path`` (a run directory or a checkpoint inside one) with a ``model_name`` model, rebuilt from
    its config.yaml and checkpoint: the averaged parameters unless ``last_iterate`` (or the run has none)."""
    checkpoint, state = read_trained(path, report)
    saved_name = state["model_config"]["name"]
    if saved_name != model_name:
        raise CheckpointError(f"checkpoint {checkpoint} is of a model.name={saved_name} run; this needs "
                              f"model.name={model_name}")
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(f"{config_path} not found: a checkpoint is read inside its run directory "
                              "(<run dir>/checkpoints/step-NNNNNN.pt), whose config names its data")
    cfg = OmegaConf.load(config_path)
    task = build_task(cfg, cfg.trainer.seed)
    model = build_model(OmegaConf.create(state["model_config"]), task.tokenizer.vocab_size, task.tokenizer.pad_id)
    params, averaged = weights(state, averaged=not last_iterate)
    model.load_state_dict(params)
    line = loaded_line(checkpoint, state["progress"]["step"], "averaged parameters" if averaged else
                       "last-iterate parameters")
    return Trained(cfg, task, model.to(device).eval(), line)
