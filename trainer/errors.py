"""Exceptions the command line turns into one `error: ...` line and an exit status (see train.cli)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A valid config that cannot run as launched (e.g. trainer.parallel=fsdp without torchrun). Exit 2."""


class TrainingDiverged(RuntimeError):
    """trainer.max_bad_steps consecutive non-finite steps. Exit 1."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived and a checkpoint is written; carries the exit status for the scheduler."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
