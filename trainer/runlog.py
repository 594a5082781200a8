"""A run's records in its directory, and its Weights & Biases run: written by rank 0 alone.

    config.yaml    the resolved config
    metrics.jsonl  one JSON object per logged step (training, skipped steps, evaluations)
    summary.json   the final metrics
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from trainer.files import append_line, write_text
from trainer.state import TrainState


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn line (a write cut short by a crash or a full disk) is
    dropped, and a missing file has none: a log is never a reason not to resume."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


class RunLog:
    def __init__(self, cfg, run_dir: Path, is_main: bool, name: str = "defaults", group: Optional[str] = None):
        self.cfg, self.run_dir, self.is_main = cfg, run_dir, is_main
        self.name, self.group = name, group
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb = None

    def start(self, state: TrainState) -> None:
        """Write the config, keep the records up to the resumed step (a resumed run re-logs the rest), and
        start (or, resuming, continue) the W&B run, whose id goes into ``state``."""
        if not self.is_main:
            return
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= state.step] if state.step else []
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self.wandb = self._init_wandb(state.wandb_id)
        if self.wandb is not None:
            state.wandb_id = self.wandb.id

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        append_line(self.metrics_path, json.dumps(record))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def write_summary(self, summary: dict) -> Path:
        path = self.run_dir / "summary.json"
        write_text(path, json.dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if k != "examples"})
        return path

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def _init_wandb(self, run_id: Optional[str]):
        """One W&B run per job; offline with a notice when credentials or network are missing."""
        logger = self.cfg.logger
        if logger.name == "none" or logger.mode == "disabled":
            return None
        import wandb

        mode = logger.mode.value
        netrc = Path.home() / ".netrc"
        has_key = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
        why = ""
        if mode == "online" and not has_key:
            why, mode = "no credentials (WANDB_API_KEY or `wandb login`), so ", "offline"
        kwargs = dict(project=logger.project, entity=logger.entity, dir=str(self.run_dir), id=run_id,
                      resume="allow", name=self.name, group=self.group,
                      config=OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True))
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                # silent: W&B's own banner and its ~30-line history and summary at the end say less than our line
                run = wandb.init(mode=attempt, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
            except Exception as error:  # network, auth or service failure: never lose the run
                print(f"W&B: {attempt} init failed ({type(error).__name__}: {error}); " +
                      ("retrying offline" if attempt == "online" else "continuing without W&B"))
                continue
            print(f"W&B: {run.url}" if attempt == "online" else  # one line: where the run is
                  f"W&B: {why}offline run in {run.sync_dir} (upload it with `wandb sync`)")
            return run
        return None
