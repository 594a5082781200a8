"""torch's CPU dropout masks against the exact kernel (trainer/bernoulli.py), on the study's training step.

For each task, two runs built as train.py builds them (`experiment=study/<task>_sm3`, the same seed,
each with its own random generator state) take turns of `--steps` training steps through train.py's
own `train_step`: one with torch's `bernoulli_`, one with the kernel, the order swapped each round, so
that a shared machine's drifts hit both. Their losses must be identical, bit for bit, and the script
stops if they are not. One thread, as a study lane runs (`--threads`). Also the op alone, on a tensor
of the size of the tiny Transformer's feed-forward activations.

    uv run python scripts/bench_bernoulli.py      # writes docs/bench_bernoulli.md and .json

The .json's step ratios are what scripts/study.py's report applies to the record's runs (drawn with torch's
masks) for one pass of the study with the kernel.
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

from trainer import bernoulli
from trainer.config import compose
from trainer.machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"mt": "experiment=study/mt_sm3", "lm": "experiment=study/lm_sm3"}


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
        cfg = compose(overrides)
        self.train = train
        run_dir.mkdir(parents=True)
        self.run = train.set_up(cfg, run_dir)
        self.batches = train.TrainBatches(self.run)
        self.rng = torch.get_rng_state()
        self.losses: list[float] = []

    def steps(self, n: int, fast: bool) -> float:
        """Seconds a step over ``n`` steps, with the kernel or torch's."""
        (bernoulli.enable if fast else bernoulli.disable)()
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        for _ in range(n):
            result = self.train.train_step(self.run, self.batches)
            self.run.state.step += 1
            self.losses.append(result.loss)
        seconds = (time.perf_counter() - start) / n
        self.rng = torch.get_rng_state()
        return seconds


def bench_task(overrides: list[str], rounds: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {fast: Runner(overrides, Path(tmp) / str(fast)) for fast in (False, True)}
        for fast, runner in runs.items():  # warm-up: allocations, oneDNN primitives
            runner.steps(2, fast)
        times = {False: [], True: []}
        for i in range(rounds):
            for fast in ((False, True) if i % 2 == 0 else (True, False)):
                times[fast].append(runs[fast].steps(steps, fast))
        if runs[False].losses != runs[True].losses:
            sys.exit(f"{' '.join(overrides)}: the losses differ with the kernel: it is not exact on this torch")
        return {"torch": statistics.median(times[False]), "kernel": statistics.median(times[True]),
                "steps": len(runs[True].losses), "precision": runs[True].train.precision_name(runs[True].run.autocast)}


def bench_op(size: int, repeats: int) -> tuple[float, float]:
    x, times = torch.empty(size), {False: [], True: []}
    for _ in range(repeats):
        for fast in (False, True):
            (bernoulli.enable if fast else bernoulli.disable)()
            start = time.perf_counter()
            x.bernoulli_(0.9)
            times[fast].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="steps per run and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_bernoulli.md")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both tasks, e.g. trainer.precision=bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not bernoulli.enable():
        sys.exit("the exact dropout kernel is not available here (see the warning above)")
    started = time.time()
    op = bench_op(128 * 1600, 30)
    results = {task: bench_task([experiment, "logger=none", *args.overrides], args.rounds, args.steps)
               for task, experiment in TASKS.items()}
    command = " ".join(["uv run python scripts/bench_bernoulli.py", *sys.argv[1:]])
    lines = [f"`{command}` ({time.time() - started:.0f} s), {cpu_description()}, {args.threads} thread(s), "
             f"torch {torch.__version__}.", "",
             f"`bernoulli_(0.9)` on {128 * 1600} float32 elements: torch {op[0] * 1e3:.3f} ms, the kernel "
             f"{op[1] * 1e3:.3f} ms ({op[1] / op[0]:.2f}x); medians of 30, alternating.", "",
             f"The study's training step (SM3, train.py's `train_step`), medians of {args.rounds} rounds of "
             f"{args.steps} steps per run, alternating; the two runs' losses identical over all "
             "their steps:", "",
             "| task | precision | steps a run | s / step, torch's masks | s / step, the kernel | x torch's |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {task} | {r['precision']} | {r['steps']} | {r['torch']:.4f} | {r['kernel']:.4f} | "
              f"{r['kernel'] / r['torch']:.3f} |" for task, r in results.items()]
    args.out.write_text("\n".join(lines) + "\n")
    precisions = {r["precision"] for r in results.values()}
    args.out.with_suffix(".json").write_text(json.dumps({
        "command": command, "cpu": cpu_description(), "threads": args.threads, "precision": " / ".join(precisions),
        "step_ratio": {task: r["kernel"] / r["torch"] for task, r in results.items()}}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
