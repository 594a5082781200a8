"""The study (docs/study/README.md): SM3, Adam, Adagrad and Adafactor, tuned the same way on both
built-in tasks, then re-run with seeds, then compared at equal memory.

    uv run python scripts/study.py              # every run, then the report (~90 min on 2 CPU cores)
    uv run python scripts/study.py --report     # only the report, from the runs already there
    uv run python scripts/study.py --tasks lm   # one task

The protocol, the same for every optimizer, per task (mt: translation, chosen on validation BLEU;
lm: language modelling, chosen on validation perplexity; both of the Polyak-averaged parameters,
what train.py returns to a sweeper):
1. tune: the learning-rate grid of ``experiment=study/<task>_<optim>`` (5 values 2x apart; SM3 also
   momentum 0 and 0.9). While the best learning rate (of each momentum, for SM3) sits at an end of
   what was run, one more value 2x beyond it (at most two more), so that the grid brackets the best;
2. SM3 only: warm-up over 2% and 10% of the steps at its best setting (the grid used 5%);
3. seeds: the best setting of each optimizer with seeds 1 and 2 (seed 0 is its tuning run);
4. mt only, equal memory: the memory of Adam's run (parameters, gradients and optimizer state in
   bytes) is the budget; SM3 and Adafactor (EQUAL_MEMORY: the two whose state is a few vectors)
   each train the widest model that fits in it, at their tuned setting, with seeds 0, 1 and 2.
   Adagrad (state as large as the parameters) is not run there, to keep the study within ~80 min.

Runs live under multirun/study/<task>_<optim>[_equal_memory]/ (Hydra multiruns of train.py; a
finished run is never redone, so an interrupted study continues where it stopped); the report
goes to docs/study/. Every phase's wall time is written to multirun/study/timings.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

from scripts.compare import Job, find_jobs
from trainer.tasks import LanguageModelTask, TranslationTask

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "multirun" / "study"
EXTRA: list[str] = []  # overrides added to every run (--extra: smoke tests)
OPTIMIZERS = ("adam", "adagrad", "adafactor", "sm3")
TASKS = ("mt", "lm")
KIND = {"mt": TranslationTask, "lm": LanguageModelTask}  # what judges a run: the trainer's own tasks
METRIC = {task: (kind.metric, kind.higher_is_better) for task, kind in KIND.items()}
SEEDS = (1, 2)
GRID_WARMUP = 0.05  # schedule.warmup_fraction of the grids (conf/experiment/study/<task>.yaml)
WARMUPS = (0.02, 0.10)  # SM3's, tried at its best setting
EQUAL_MEMORY = ("sm3", "adafactor")  # besides Adam, whose budget it is
WIDTHS = (128, 144, 160, 176, 192, 208, 224, 240, 256)  # d_model candidates (d_ff = 4 d_model)
MAX_EXTENSIONS = 2


def sweep_dir(task: str, optim: str, suffix: str = "") -> Path:
    return RUNS / f"{task}_{optim}{suffix}"


def launch(task: str, optim: str, overrides: list[str], suffix: str = "") -> None:
    """One Hydra multirun of train.py (its jobs one after another, in one process)."""
    command = [sys.executable, "train.py", "-m", f"experiment=study/{task}_{optim}",
               f"hydra.sweep.dir={sweep_dir(task, optim, suffix)}", *overrides, *EXTRA]
    line = " ".join(command[1:]).replace(str(ROOT) + "/", "")
    print("+", line, flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / "commands.log", "a") as f:  # the report lists every launch, in order
        f.write(line + "\n")
    subprocess.run(command, cwd=ROOT, check=False)  # a failed job is recorded; the sweep goes on


def grid(task: str, optim: str) -> dict[str, list[float]]:
    path = ROOT / "conf" / "experiment" / "study" / f"{task}_{optim}.yaml"
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    return {key: [float(v) for v in str(values).split(",")] for key, values in params.items()}


def score(job: Job, task: str) -> float:
    """The selection value, higher is better; -inf for a run that failed or diverged."""
    key, higher = METRIC[task]
    summary = job.summary or {}
    value = summary.get(f"valid_{key}_averaged", summary.get(f"valid_{key}"))
    if value is None or not math.isfinite(value):
        return -math.inf
    return value if higher else -value


def setting(job: Job) -> dict[str, float]:
    """The swept values of a job: learning rate, momentum, warm-up fraction and seed."""
    optim, schedule, trainer = (job.config.get(k, {}) for k in ("optim", "schedule", "trainer"))
    return {"optim.lr": optim.get("lr"), "optim.momentum": optim.get("momentum"),
            "schedule.warmup_fraction": schedule.get("warmup_fraction"), "trainer.seed": trainer.get("seed")}


def jobs_of(task: str, optim: str, suffix: str = "") -> list[Job]:
    path = sweep_dir(task, optim, suffix)
    return find_jobs(path) if path.is_dir() else []


def best_job(task: str, optim: str) -> Job | None:
    """The best seed-0 run of the tuning phases."""
    tuned = [j for j in jobs_of(task, optim) if j.config and setting(j)["trainer.seed"] == 0]
    return max(tuned, key=lambda j: score(j, task), default=None)


def overrides_of(job: Job, optim: str) -> list[str]:
    s = setting(job)
    keys = ["optim.lr", "schedule.warmup_fraction"] + (["optim.momentum"] if optim == "sm3" else [])
    return [f"{k}={s[k]:g}" for k in keys]


def tune(task: str, optim: str) -> None:
    launch(task, optim, [])  # the grid in the experiment's hydra.sweeper.params
    for momentum in grid(task, optim).get("optim.momentum", [None]):  # SM3: bracket each momentum's best
        for _ in range(MAX_EXTENSIONS):
            runs = [j for j in jobs_of(task, optim) if j.config and setting(j)["trainer.seed"] == 0
                    and setting(j)["schedule.warmup_fraction"] == GRID_WARMUP
                    and (momentum is None or setting(j)["optim.momentum"] == momentum)]
            best = max(runs, key=lambda j: score(j, task), default=None)
            if best is None or not math.isfinite(score(best, task)):
                break
            lr, lrs = setting(best)["optim.lr"], sorted(setting(j)["optim.lr"] for j in runs)
            if lrs[0] < lr < lrs[-1]:
                break
            extra = [] if momentum is None else [f"optim.momentum={momentum:g}"]
            launch(task, optim, [f"optim.lr={lr * (0.5 if lr == lrs[0] else 2.0):g}", *extra])


def warmups(task: str) -> None:
    best = best_job(task, "sm3")
    if best is not None:
        fixed = [o for o in overrides_of(best, "sm3") if not o.startswith("schedule.")]
        launch(task, "sm3", fixed + ["schedule.warmup_fraction=" + ",".join(f"{w:g}" for w in WARMUPS)])


def seeds(task: str, optim: str) -> None:
    best = best_job(task, optim)
    if best is not None:
        launch(task, optim, overrides_of(best, optim) + ["trainer.seed=" + ",".join(map(str, SEEDS))])


def footprint(optim: str, momentum: float, width: int, vocab: int) -> tuple[int, int]:
    """(parameters, bytes of parameters + gradients + optimizer state after one step) of the
    transformer_tiny shape at d_model=width, d_ff=4*width (state as ``sm3.optimizer_state_bytes``)."""
    import torch

    from models import build_model
    from scripts.bench_loop import compose
    from sm3 import optimizer_state_bytes
    from trainer.optim import build_optimizer

    cfg = compose(["model=transformer_tiny", f"model.d_model={width}", f"model.d_ff={4 * width}",
                   f"optim={optim}", f"optim.momentum={momentum}"])
    params = list(build_model(cfg.model, vocab, 0).parameters())
    optimizer = build_optimizer(cfg.optim, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in params)
    return sum(p.numel() for p in params), 2 * weights + optimizer_state_bytes(optimizer)


def equal_memory(task: str = "mt") -> dict:
    """Each EQUAL_MEMORY optimizer, at its tuned setting, trains the widest model that fits in the
    bytes of Adam's tuned run, with 3 seeds; returns the plan (also written to equal_memory.json)."""
    adam = best_job(task, "adam")
    if adam is None or not adam.summary:
        return {}
    vocab = adam.summary["vocab_size"]
    parameters, budget = footprint("adam", 0.0, 128, vocab)
    assert parameters == adam.summary["parameters"], "the budget is not the size of Adam's run"
    plan = {"budget_bytes": budget, "adam": {"d_model": 128, "parameters": parameters, "bytes": budget}}
    for optim in EQUAL_MEMORY:
        best = best_job(task, optim)
        if best is None:
            continue
        momentum = (setting(best)["optim.momentum"] or 0.0) if optim == "sm3" else 0.0
        fits = [(w, *footprint(optim, momentum, w, vocab)) for w in WIDTHS]
        width, parameters, used = max((f for f in fits if f[2] <= budget), default=fits[0])
        plan[optim] = {"d_model": width, "parameters": parameters, "bytes": used}
        launch(task, optim, overrides_of(best, optim) + [f"model.d_model={width}", f"model.d_ff={4 * width}",
                                                       "trainer.seed=0,1,2"], suffix="_equal_memory")
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"{task}_equal_memory.json").write_text(json.dumps(plan, indent=2))
    return plan


def timed(timings: dict, name: str, fn, *args) -> None:
    start = time.time()
    fn(*args)
    timings[name] = timings.get(name, 0.0) + time.time() - start
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "timings.json").write_text(json.dumps(timings, indent=2))


def run_study(tasks: list[str]) -> None:
    path = RUNS / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    for task in tasks:
        for optim in OPTIMIZERS:
            timed(timings, f"{task} tune {optim}", tune, task, optim)
        timed(timings, f"{task} warm-up sm3", warmups, task)
        for optim in OPTIMIZERS:
            timed(timings, f"{task} seeds {optim}", seeds, task, optim)
        if task == "mt":
            timed(timings, f"{task} equal memory", equal_memory, task)


def main() -> None:
    global RUNS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--report", action="store_true", help="only write the report from existing runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "study")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the runs go (default multirun/study)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (smoke tests)")
    args = parser.parse_args()
    RUNS = args.runs.resolve()
    EXTRA[:] = args.extra
    if not args.report:
        run_study(args.tasks)
    from scripts.study_report import write_report

    print(f"report: {write_report(RUNS, args.out)}")


if __name__ == "__main__":
    main()
