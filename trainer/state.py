"""What a run has done so far: saved in every checkpoint, so a resumed run continues exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps count too)
    epoch: int = 0
    batch_index: int = 0  # this rank's next batch within the epoch
    tokens: int = 0  # target tokens trained on, all ranks together
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient)
    train_seconds: float = 0.0  # wall time spent in training steps (not evaluation), over every resume
    wandb_id: Optional[str] = None  # a resumed job continues the same W&B run

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict) -> "TrainState":
        """Fields missing from older checkpoints take their defaults; unknown ones are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})
