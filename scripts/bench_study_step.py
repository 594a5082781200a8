"""The study's training step as the record's runs took it against the step train.py takes now.

Two changes since the record (docs/study/runs/), neither of which changes a number: dropout masks come from
trainer/bernoulli.py's kernel, not torch's serial CPU `bernoulli_` (the same masks, bit for bit), and the
training loss no longer computes the unsmoothed negative log-likelihood beside it, which it threw away.
For each task, two runs built as train.py builds them (`experiment=study/<task>_sm3`, the same seed, each
with its own random generator state) take turns of `--steps` steps through train.py's own `train_step`:
one as the record's runs stepped (torch's masks, the discarded log-likelihood computed), one as train.py
steps now, the order swapped each round so that a shared machine's drifts hit both. Their losses must be
identical, bit for bit, and the script stops if they are not. One thread, as a study lane runs
(`--threads`). Also the mask op alone, on a tensor the size of the tiny Transformer's feed-forward layer.

    uv run python scripts/bench_study_step.py      # writes docs/bench_study_step.md and .json

The .json's step ratios (now / the record's, per task) are what scripts/study.py's report applies to the
record's runs for how long one pass of the study takes now.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import bernoulli, tasks
from trainer.config import compose
from trainer.machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"mt": "experiment=study/mt_sm3", "lm": "experiment=study/lm_sm3"}


def record_sequence_loss(logits, target, pad_id, label_smoothing=0.0):
    """models.transformer.sequence_loss as the record's runs ran it: the loss, and the log-likelihood beside it."""
    loss = NOW_SEQUENCE_LOSS(logits, target, pad_id, label_smoothing)
    F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=pad_id, reduction="sum").detach()
    return loss


NOW_SEQUENCE_LOSS = tasks.sequence_loss


def as_the_record(on: bool) -> None:
    """The step as the record's runs took it (True) or as train.py takes it now (False)."""
    (bernoulli.disable if on else bernoulli.enable)()
    tasks.sequence_loss = record_sequence_loss if on else NOW_SEQUENCE_LOSS


class Runner:
    """A train.py run whose steps can be taken a few at a time, with its own generator state."""

    def __init__(self, overrides: list[str], run_dir: Path):
        import train
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import open_dict

        hydra = compose(overrides, hydra_config=True)
        with open_dict(hydra):  # what a single run's Hydra app sets; set_up names the run's log from it
            hydra.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(hydra)
        self.train = train
        run_dir.mkdir(parents=True)
        self.run = train.set_up(compose(overrides), run_dir)
        self.batches = train.TrainBatches(self.run)
        self.rng = torch.get_rng_state()
        self.losses: list[float] = []

    def steps(self, n: int, record: bool) -> float:
        """Seconds a step over ``n`` steps, taken as the record's runs took them or as now."""
        as_the_record(record)
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        for _ in range(n):
            result = self.train.train_step(self.run, self.batches)
            self.run.state.step += 1
            self.losses.append(result.loss)
        seconds = (time.perf_counter() - start) / n
        self.rng = torch.get_rng_state()
        as_the_record(False)  # train.py's own state again
        return seconds


def bench_task(overrides: list[str], rounds: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {record: Runner(overrides, Path(tmp) / str(record)) for record in (True, False)}
        for record, runner in runs.items():  # warm-up: allocations, oneDNN primitives
            runner.steps(2, record)
        times = {True: [], False: []}
        for i in range(rounds):
            for record in ((True, False) if i % 2 == 0 else (False, True)):
                times[record].append(runs[record].steps(steps, record))
        if runs[True].losses != runs[False].losses:
            sys.exit(f"{' '.join(overrides)}: the losses differ from the record's way: a change is not exact here")
        return {"record": statistics.median(times[True]), "now": statistics.median(times[False]),
                "steps": len(runs[False].losses), "precision": runs[False].train.precision_name(runs[False].run.autocast)}


def bench_masks(size: int, repeats: int) -> tuple[float, float]:
    x, times = torch.empty(size), {True: [], False: []}
    for _ in range(repeats):
        for record in (True, False):
            as_the_record(record)
            start = time.perf_counter()
            x.bernoulli_(0.9)
            times[record].append(time.perf_counter() - start)
    as_the_record(False)
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="steps per run and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_study_step.md")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both tasks, e.g. trainer.precision=bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not bernoulli.enable():
        sys.exit("the dropout kernel is not available here (see the warning above)")
    started = time.time()
    masks = bench_masks(128 * 1600, 30)
    results = {task: bench_task([experiment, "logger=none", *args.overrides], args.rounds, args.steps)
               for task, experiment in TASKS.items()}
    command = " ".join(["uv run python scripts/bench_study_step.py", *sys.argv[1:]])
    lines = [f"`{command}` ({time.time() - started:.0f} s), {cpu_description()}, {args.threads} thread(s), "
             f"torch {torch.__version__}.", "",
             f"`bernoulli_(0.9)` on {128 * 1600} float32 elements: torch's {masks[0] * 1e3:.3f} ms, the kernel's "
             f"{masks[1] * 1e3:.3f} ms ({masks[1] / masks[0]:.2f}x); medians of 30, alternating.", "",
             f"The study's training step (SM3, train.py's `train_step`), medians of {args.rounds} rounds of "
             f"{args.steps} steps per run, alternating; the two runs' losses identical over all their steps:", "",
             "| task | precision | steps a run | s / step, as the record's runs | s / step, now | x the record's |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {task} | {r['precision']} | {r['steps']} | {r['record']:.4f} | {r['now']:.4f} | "
              f"{r['now'] / r['record']:.3f} |" for task, r in results.items()]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({
        "command": command, "cpu": cpu_description(), "threads": args.threads,
        "precision": " / ".join(sorted({r["precision"] for r in results.values()})),
        "step_ratio": {task: r["now"] / r["record"] for task, r in results.items()}}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
