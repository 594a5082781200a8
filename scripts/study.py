"""The study (docs/study/README.md): SM3, Adam, Adagrad and Adafactor, tuned the same way on both
built-in tasks, re-run with seeds, compared at equal memory; then SM3's momentum and beta examined, and
every optimizer's best setting run at 4x the steps and at equal wall time.

    uv run python scripts/study.py                      # every part, then the report
    uv run python scripts/study.py --part long beta     # some parts (from best.json when tune's runs are absent)
    uv run python scripts/study.py --report             # only the report, from the runs' records
    uv run python scripts/study.py --tasks lm           # one task
    uv run python scripts/study.py --out docs/study_new --runs multirun/study_new   # a new study from nothing

The parts and their protocol are in scripts/study_protocol.py (PROTOCOL), which the report quotes.
Runs live under multirun/study/<task>_<optim>[_<part>]/ (Hydra multiruns of train.py; a finished run is
never redone, so a stopped study (SIGTERM or Ctrl-C: the running jobs checkpoint, and each phase's time so far is
kept) continues where it stopped, on another machine too: the committed record is restored there first, its
precision is kept, and a launch whose jobs have all finished is not started). Each finished run's record (config,
summary, metrics; not its checkpoints) is copied to docs/study/runs/, with the plans, every phase's wall
time (timings.json) and every launch (commands.log): the report is drawn from there, a page per part and
task, so the evidence outlives the machine and a page of a part not rerun is kept. Phases run two at a time
(`--lanes 2`, the default), each run on one of a 2-core machine's cores (its output in multirun/study/logs/):
first the tuning, a phase per task and optimizer, then the other parts; `--lanes 1` runs one phase at a time
on every core.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from scripts.compare import Job, find_jobs, mean_std
from scripts.study_report import WALL, archive, at_pace, copy_runs, wall_seconds, write_report
from scripts.study_protocol import (BETA_LR_DIVISORS, BETAS, EQUAL_MEMORY, GRID_WARMUP, HORIZON, KIND,
                                    MAX_EXTENSIONS, MOMENTUM_WARMUPS, OPTIMIZERS, ROOT, SEEDS, STEPS, TASKS,
                                    WARMUPS, WIDTHS, footprint, grid, momentum_grid_runs, same_setting, score,
                                    setting)

RUNS = ROOT / "multirun" / "study"
RECORD = ROOT / "docs" / "study" / "runs"  # committed: each finished run's record, plans, phase times, launches
# scripts/bench_study_step.py's measurement, per task: train.py's training step now, as a share of the step the
# record's runs took (the same numbers: since then, dropout masks from trainer/bernoulli.py and no discarded NLL)
STEP_BENCH = ROOT / "docs" / "bench_study_step.json"
BEST = ROOT / "docs" / "study" / "best.json"  # tune's best settings, where the other parts start
EXTRA: list[str] = []  # overrides added to every run (--extra: smoke tests)
# trainer.precision of every run ("bf16" / "fp32"; None: the configs' auto): by default the record's, so that a study
# continued on a CPU of another kind keeps one precision (the job directories leave it out, so its runs are found)
PRECISION: str | None = None
PARTS = ("tune", "momentum", "beta", "long", "equal-time", "equal-memory")  # equal memory: also with tune
THREADS: int | None = None  # each launch's OpenMP threads when parts run side by side (None: torch's default)
_RECORD = threading.Lock()  # two lanes write the record
STOP = threading.Event()  # set by SIGTERM / SIGINT: each lane ends after its running job (which checkpoints)
_CHILDREN: set[subprocess.Popen] = set()  # the running launches, which a stop passes SIGTERM on to


class Stopped(Exception):
    """The study was told to stop; rerunning the same command continues it."""


def restore(record: Path, runs: Path) -> int:
    """Copy each recorded run (docs/study/runs/, committed) back to where the study keeps its runs, unless a run
    is there already, so that a study continues on another machine: train.py sees the summary and skips the job.
    Returns how many were restored."""
    return copy_runs(record, runs, keep_existing=True)


def record_precision(record: Path) -> str | None:
    """The precision of the recorded runs as ``trainer.precision`` names it ("bf16" or "fp32"); None when the
    record has no run. A record that mixes them is an error: its comparisons would mix them too."""
    names = {json.loads(p.read_text()).get("precision", "float32") for p in record.glob("*/*/summary.json")}
    if len(names) > 1:
        raise SystemExit(f"error: the runs in {record} mix precisions ({', '.join(sorted(names))}): pass --precision "
                         "bf16 or fp32 to choose, or start a new study in new folders (--out, --runs)")
    return None if not names else ("fp32" if names == {"float32"} else "bf16")


def _emulated(precision: str) -> str:
    import torch

    from train import fast_bf16

    if precision != "bf16" or fast_bf16(torch.device("cpu")):
        return ""
    return " (this CPU has no bf16 instructions: emulated, ~2.4x float32's step on an Intel Xeon without them)"


def _stop(signum, frame) -> None:
    if not STOP.is_set():
        STOP.set()
        print(f"study: signal {signum}: stopping after the running jobs (they checkpoint); rerun the same command "
              "to continue", flush=True)
        for child in list(_CHILDREN):  # train.py checkpoints and exits 143; its multirun stops there
            child.send_signal(signal.SIGTERM)


def _run(command: list[str], **kwargs) -> None:
    """A launch's process, waited for; a failed job is recorded by train.py and the sweep goes on."""
    with subprocess.Popen(command, **kwargs) as child:
        _CHILDREN.add(child)
        try:
            child.wait()
        finally:
            _CHILDREN.discard(child)


def sweep_dir(task: str, optim: str, suffix: str = "") -> Path:
    return RUNS / f"{task}_{optim}{suffix}"


def launch(task: str, optim: str, overrides: list[str], suffix: str = "") -> None:
    """One Hydra multirun of train.py (its jobs one after another, in one process)."""
    if STOP.is_set():
        raise Stopped
    command = [sys.executable, "train.py", "-m", f"experiment=study/{task}_{optim}",
               f"hydra.sweep.dir={sweep_dir(task, optim, suffix)}", *overrides,
               *([f"trainer.precision={PRECISION}"] if PRECISION else []), *EXTRA]
    line = " ".join(command[1:]).replace(str(ROOT) + "/", "")
    if all(_finished(job) for job in job_dirs(command[3:])):  # train.py would skip each: save its start-up
        print("= finished:", line, flush=True)
        return
    print("+", line, flush=True)
    with _RECORD:
        RECORD.mkdir(parents=True, exist_ok=True)
        with open(RECORD / "commands.log", "a") as f:  # the report lists every launch, in order
            f.write(line + "\n")
    if THREADS is None:
        _run(command, cwd=ROOT)
    else:  # side by side with another part: a share of the cores, and its own log (progress would interleave)
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
        log = RUNS / "logs" / f"{sweep_dir(task, optim, suffix).name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            _run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    with _RECORD:
        archive(RUNS, RECORD)
    if STOP.is_set():
        raise Stopped


def job_dirs(arguments: list[str]) -> list[Path]:
    """The job directories of a multirun of train.py with these arguments (``experiment=...``, hydra.sweep.dir and
    the overrides), named as Hydra's basic sweeper names them: the experiment's sweep params, replaced by the
    arguments' keys, every value list expanded, each job's overrides less the experiment's exclude_keys."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from trainer.config import compose

    sweep = Path(next(a for a in arguments if a.startswith("hydra.sweep.dir=")).split("=", 1)[1])
    task_arguments = [a for a in arguments if not a.startswith("hydra.")]
    hydra = compose([a for a in task_arguments if a.startswith("experiment=")], hydra_config=True).hydra
    naming, parser = hydra.job.config.override_dirname, OverridesParser.create()
    params = [f"{k}={v}" for k, v in (hydra.sweeper.params or {}).items()]
    jobs = BasicSweeper.split_arguments(parser.parse_overrides(params + task_arguments), None)[0]
    return [sweep / get_overrides_dirname(parser.parse_overrides(job), list(naming.exclude_keys), naming.item_sep,
                                          naming.kv_sep) for job in jobs]


def _finished(job: Path) -> bool:
    """What train.py's ``finished`` skips: a summary at the run's trainer.max_steps."""
    try:
        steps = json.loads((job / "summary.json").read_text())["step"]
        return steps >= OmegaConf.load(job / "config.yaml").trainer.max_steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def jobs_of(task: str, optim: str, suffix: str = "") -> list[Job]:
    path = sweep_dir(task, optim, suffix)
    return find_jobs(path) if path.is_dir() else []


def best_job(task: str, optim: str, momentum: float | None = None, suffix: str = "") -> Job | None:
    """The best seed-0 run of a part (default: the tuning phases), of one momentum if given."""
    tuned = [j for j in jobs_of(task, optim, suffix) if j.config and setting(j)["trainer.seed"] == 0
             and (momentum is None or setting(j)["optim.momentum"] == momentum)]
    return max(tuned, key=lambda j: score(j, task), default=None)


def overrides_of(job: Job, optim: str) -> list[str]:
    s = setting(job)
    keys = ["optim.lr", "schedule.warmup_fraction"] + (["optim.momentum", "optim.beta"] if optim == "sm3" else [])
    return [f"{k}={s[k]:g}" for k in keys if s[k] is not None]


def _best_key(optim: str, momentum: float | None) -> str:
    return optim if momentum is None else f"{optim}_momentum_{momentum:g}"


def best_overrides(task: str, optim: str, momentum: float | None = None) -> list[str]:
    """The tuned setting, as overrides: from tune's runs where they are here, else from best.json."""
    job = best_job(task, optim, momentum)
    if job is not None and math.isfinite(score(job, task)):
        return overrides_of(job, optim)
    saved = json.loads(BEST.read_text()) if BEST.exists() else {}
    entry = saved.get(task, {}).get(_best_key(optim, momentum))
    if entry is None:
        raise SystemExit(f"error: no tuned setting of {optim} for {task}: run `--part tune` first ({BEST} lacks it)")
    return entry["overrides"]


def seed_group(task: str, optim: str, best: Job, suffix: str = "") -> list[Job]:
    """The finished runs (every seed) of ``best``'s setting in a part."""
    return [j for j in jobs_of(task, optim, suffix) if j.summary is not None and same_setting(j, best)]


def write_best(task: str) -> None:
    """best.json: per optimizer (and SM3's momentum 0.9) the tuned overrides and test metric over seeds."""
    saved = json.loads(BEST.read_text()) if BEST.exists() else {}
    metric = f"test_{KIND[task].metric}_averaged"
    entries = {}
    for optim in OPTIMIZERS:
        for momentum in [None] + ([0.9] if optim == "sm3" else []):
            best = best_job(task, optim, momentum)
            if best is None:
                continue
            group = seed_group(task, optim, best)
            mean, std = mean_std([j.summary.get(metric) for j in group])
            entries[_best_key(optim, momentum)] = {"overrides": overrides_of(best, optim), "steps": STEPS[task],
                                                   "test": [mean, std], "seeds": len(group)}
    saved[task] = entries
    BEST.parent.mkdir(parents=True, exist_ok=True)
    BEST.write_text(json.dumps(saved, indent=1) + "\n")


def _lr(overrides: list[str]) -> float:
    return float(next(o for o in overrides if o.startswith("optim.lr=")).split("=", 1)[1])


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0] not in keys]


def _values(key: str, values) -> str:
    return f"{key}=" + ",".join(f"{v:g}" for v in values)


def horizon(task: str) -> list[str]:
    """HORIZON times the task's steps, valid and test evaluated six times along the way."""
    steps = HORIZON * STEPS[task]
    return [f"trainer.max_steps={steps}", f"trainer.eval_interval={steps // 6}",
            f"trainer.checkpoint_interval={steps}", "trainer.eval_test=true"]


def bracket(task: str, runs, extend, planned, factor: float = 2.0, upward: bool = True) -> None:
    """While the best of ``runs()`` (seed-0 runs, on validation) has the lowest learning rate run (or the highest,
    if ``upward``), ``extend(lr)`` runs one more ``factor`` beyond it, so that the best is bracketed: at most
    MAX_EXTENSIONS rates beyond the ``planned`` ones, counting those already run, so that a study continued after
    a stop runs what one run straight through would."""
    while True:
        done = runs()
        best = max(done, key=lambda j: score(j, task), default=None)
        if best is None or not math.isfinite(score(best, task)):
            return
        lr, lrs = setting(best)["optim.lr"], sorted(setting(j)["optim.lr"] for j in done)
        beyond = {x for x in lrs if not any(math.isclose(x, p, rel_tol=1e-4) for p in planned)}
        if len(beyond) >= MAX_EXTENSIONS:
            return
        if lr == lrs[0]:
            extend(lr / factor)
        elif upward and lr == lrs[-1]:
            extend(lr * factor)
        else:
            return


def tune(task: str, optim: str) -> None:
    launch(task, optim, [])  # the grid in the experiment's hydra.sweeper.params
    for momentum in grid(task, optim).get("optim.momentum", [None]):  # SM3: bracket each momentum's best
        extra = [] if momentum is None else [f"optim.momentum={momentum:g}"]
        bracket(task, lambda: [j for j in jobs_of(task, optim) if j.config and setting(j)["trainer.seed"] == 0
                               and setting(j)["schedule.warmup_fraction"] == GRID_WARMUP
                               and (momentum is None or setting(j)["optim.momentum"] == momentum)],
                lambda lr: launch(task, optim, [f"optim.lr={lr:g}", *extra]), grid(task, optim)["optim.lr"])


def warmups(task: str) -> None:
    best = best_job(task, "sm3")
    if best is not None:
        fixed = [o for o in overrides_of(best, "sm3") if not o.startswith("schedule.")]
        launch(task, "sm3", fixed + ["schedule.warmup_fraction=" + ",".join(f"{w:g}" for w in WARMUPS)])


def seeds(task: str, optim: str) -> None:
    best = best_job(task, optim)
    if best is not None:
        launch(task, optim, overrides_of(best, optim) + ["trainer.seed=" + ",".join(map(str, SEEDS))])


def memory_plan(task: str) -> dict:
    """The equal-memory widths: Adam's tuned run (width 128) holds the budget; each EQUAL_MEMORY optimizer, at
    its tuned momentum, gets the widest transformer_tiny that fits in it."""
    from scripts.bench_loop import compose

    vocab = compose([f"experiment=study/{task}_adam"]).data.vocab_size
    parameters, budget = footprint("adam", 0.0, 128, vocab)
    plan = {"budget_bytes": budget, "vocab_size": vocab, "adam": {"d_model": 128, "parameters": parameters,
                                                                  "bytes": budget}}
    for optim in EQUAL_MEMORY:
        tuned = best_overrides(task, optim)
        momentum = next((float(o.split("=")[1]) for o in tuned if o.startswith("optim.momentum=")), 0.0)
        fits = [(w, *footprint(optim, momentum, w, vocab)) for w in WIDTHS]
        width, parameters, used = max((f for f in fits if f[2] <= budget), default=fits[0])
        plan[optim] = {"d_model": width, "parameters": parameters, "bytes": used, "overrides": tuned}
    return plan


def _width(width: int) -> list[str]:
    return [f"model.d_model={width}", f"model.d_ff={4 * width}"]


def equal_memory(task: str = "mt") -> dict:
    """Each EQUAL_MEMORY optimizer, at its tuned setting, trains the widest model that fits in the
    bytes of Adam's tuned run, with 3 seeds; returns the plan (also written to equal_memory.json)."""
    adam = best_job(task, "adam")
    if adam is None or not adam.summary:
        return {}
    plan = memory_plan(task)
    assert plan["adam"]["parameters"] == adam.summary["parameters"], "the budget is not the size of Adam's run"
    for optim in EQUAL_MEMORY:
        launch(task, optim, plan[optim]["overrides"] + _width(plan[optim]["d_model"]) + ["trainer.seed=0,1,2"],
               suffix="_equal_memory")
    RECORD.mkdir(parents=True, exist_ok=True)
    (RECORD / f"{task}_equal_memory.json").write_text(json.dumps(plan, indent=2))
    return plan


def momentum(task: str = "mt") -> None:
    """The momentum diagnosis (scripts/study_momentum.py), then momentum 0.9 at its best learning rate and 2x it
    with longer warm-ups (with the grid's, tune's runs: not run again), and the best of those at HORIZON times the
    steps."""
    from scripts import study_momentum

    if not (RECORD / "momentum.json").exists():
        study_momentum.run(RECORD / "momentum.json")
    tuned = best_overrides(task, "sm3", 0.9)
    lr, fixed = _lr(tuned), _without(tuned, "optim.lr", "schedule.warmup_fraction")
    lrs = (lr, 2 * lr)
    launch(task, "sm3", fixed + [_values("optim.lr", lrs), _values("schedule.warmup_fraction", MOMENTUM_WARMUPS)],
           suffix="_momentum")
    grid_runs = momentum_grid_runs(jobs_of(task, "sm3"), lrs)  # the paper's warm-up: tune ran these
    missing = [x for x in lrs if not momentum_grid_runs(grid_runs, [x])]
    if missing:
        launch(task, "sm3", fixed + [_values("optim.lr", missing), f"schedule.warmup_fraction={GRID_WARMUP:g}"],
               suffix="_momentum")
    short = grid_runs + [j for j in jobs_of(task, "sm3", "_momentum")
                         if setting(j)["trainer.max_steps"] == STEPS[task]]
    best = max(short, key=lambda j: score(j, task), default=None)
    if best is not None:
        launch(task, "sm3", overrides_of(best, "sm3") + horizon(task), suffix="_momentum")


def betas(task: str) -> None:
    """SM3's tuned setting with each beta > 0 at BETA_LR_DIVISORS of its learning rate (4x lower while the
    lowest wins, at most twice), then the best of each beta with seeds 1 and 2. Beta 0 is the tuned setting
    itself, whose seeds the tune part ran: the report takes them from there."""
    tuned = best_overrides(task, "sm3")
    lr, fixed = _lr(tuned), _without(tuned, "optim.lr", "optim.beta")

    def seed0(beta: float) -> list[Job]:
        return [j for j in jobs_of(task, "sm3", "_beta") if setting(j)["optim.beta"] == beta
                and setting(j)["trainer.seed"] == 0]

    for beta in BETAS:
        lrs = [lr / d for d in BETA_LR_DIVISORS]
        launch(task, "sm3", fixed + [f"optim.beta={beta:g}", _values("optim.lr", lrs)], suffix="_beta")
        bracket(task, lambda: seed0(beta), lambda lower: launch(
            task, "sm3", fixed + [f"optim.beta={beta:g}", f"optim.lr={lower:g}"], suffix="_beta"), lrs, 4.0, False)
    for beta in BETAS:
        best = max(seed0(beta), key=lambda j: score(j, task), default=None)
        if best is not None:
            launch(task, "sm3", overrides_of(best, "sm3") + [_values("trainer.seed", SEEDS)], suffix="_beta")


def long(task: str, optims: tuple[str, ...] = OPTIMIZERS) -> None:
    """HORIZON times the steps: each optimizer at its tuned learning rate (seed 0), then at 2x each side (and
    further 2x steps while the best sits at an end, as in tuning), then each one's best with seeds; every
    optimizer's run of a phase before the next phase, so that a study stopped half-way has compared them all."""
    tuned = {optim: best_overrides(task, optim) for optim in optims}

    def at(optim: str, lrs) -> None:
        launch(task, optim, _without(tuned[optim], "optim.lr") + horizon(task) + [_values("optim.lr", lrs)],
               suffix="_long")

    for factors in ((1,), (0.5, 2)):
        for optim in optims:
            at(optim, [_lr(tuned[optim]) * f for f in factors])
    for optim in optims:
        bracket(task, lambda: [j for j in jobs_of(task, optim, "_long") if j.config
                               and setting(j)["trainer.seed"] == 0], lambda lr: at(optim, [lr]),
                [_lr(tuned[optim]) * f for f in (0.5, 1, 2)])
    for optim in optims:
        best = best_job(task, optim, suffix="_long")
        if best is not None:
            launch(task, optim, overrides_of(best, optim) + horizon(task) + [_values("trainer.seed", SEEDS)],
                   suffix="_long")


def _precision(setting) -> str:
    """``trainer.precision`` as profile_step's Stepper takes it: "bf16" or "fp32" (auto: what train.py picks)."""
    import torch

    from train import autocast_context, precision_name

    autocast = autocast_context(getattr(setting, "value", setting), torch.device("cpu"))
    return "fp32" if precision_name(autocast) == "float32" else "bf16"


def seconds_per_step(task: str, plan: dict, rounds: int = 5, steps: int = 4) -> dict[str, float]:
    """Median seconds of a training step of each plan entry, all built in this process and stepped in turn
    (a shared machine's drift hits each alike)."""
    from scripts.bench_loop import compose
    from scripts.profile_step import Stepper

    steppers = {optim: Stepper(compose([f"experiment=study/{task}_{optim}", *entry.get("overrides", []),
                                         *_width(entry["d_model"])]))
                for optim, entry in plan.items() if isinstance(entry, dict)}
    times: dict[str, list[float]] = {optim: [] for optim in steppers}
    # the runs' own: the pinned precision, else what the study configs' auto picks here
    precision = PRECISION or _precision(compose([f"experiment=study/{task}_adam"]).trainer.precision)
    for stepper in steppers.values():
        stepper.step(precision)  # one-time costs
    for _ in range(rounds):
        for optim, stepper in steppers.items():
            times[optim] += [stepper.step(precision)[0] for _ in range(steps)]
    return {optim: statistics.median(t) for optim, t in times.items()}


def equal_time(task: str = "mt") -> dict:
    """Adam at width 128 and each EQUAL_MEMORY optimizer at its equal-memory width, the same training time:
    ``STEPS * t_adam / t_optim`` steps each, with seeds 0, 1, 2 (Adam's: the tune part's, the same runs); the plan
    goes to equal_time.json."""
    path = RECORD / f"{task}_equal_time.json"
    if path.exists():  # the step counts were measured once: a continued study keeps them
        plan = json.loads(path.read_text())
    else:
        plan = memory_plan(task)
        plan["adam"]["overrides"] = best_overrides(task, "adam")
        seconds = seconds_per_step(task, plan)
        for optim, t in seconds.items():
            plan[optim].update(seconds_per_step=t, steps=round(STEPS[task] * seconds["adam"] / t))
        RECORD.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2))
    # Adam's runs are its tuned ones: the budget's width and STEPS steps, as the formula gives. Where tuning's runs
    # are absent (this part alone, from best.json), they run into tune's folder, as tuning would have run them.
    if best_job(task, "adam") is None:
        launch(task, "adam", plan["adam"]["overrides"] + [_values("trainer.seed", (0, *SEEDS))])
    else:
        seeds(task, "adam")  # nothing, once tuning has run them
    for optim in EQUAL_MEMORY:
        entry = plan[optim]
        launch(task, optim, entry["overrides"] + _width(entry["d_model"]) + [
            f"trainer.max_steps={entry['steps']}", f"trainer.eval_interval={max(1, entry['steps'] // 6)}",
            f"trainer.checkpoint_interval={entry['steps']}", "trainer.seed=0,1,2"], suffix="_equal_time")
    return plan


def timed(name: str, fn, *args) -> None:
    """Run a phase and add its wall time to the record's timings.json (summed over the sessions that ran it; a
    phase stopped half-way adds the time it ran)."""
    if STOP.is_set():  # a phase the stop came before: no time
        raise Stopped
    start = time.time()
    try:
        fn(*args)
    finally:
        _add_time(name, time.time() - start)


def _add_time(name: str, seconds: float) -> None:
    with _RECORD:
        path = RECORD / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[name] = timings.get(name, 0.0) + seconds
        RECORD.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(timings, indent=2))


def tune_optimizer(task: str, optim: str) -> None:
    """One optimizer's tuning phases: its grid (SM3: then its warm-ups), then its seeds."""
    timed(f"{task} tune {optim}", tune, task, optim)
    if optim == "sm3":
        timed(f"{task} warm-up sm3", warmups, task)
    timed(f"{task} seeds {optim}", seeds, task, optim)


# Tuning, one phase per task and optimizer, the longest first (SM3's grid has two momenta), so that side-by-side
# lanes take the next as each frees. Every later part starts from best.json, written once tuning is done.
TUNING = tuple((task, optim) for task in TASKS for optim in ("sm3", "adafactor", "adagrad", "adam"))
# The parts after tuning, the longest first (the long part in two halves), so that side-by-side lanes finish
# close together: the order of their one-core minutes in the record (`projection`; a test checks it).
HALVES = (OPTIMIZERS[:2], OPTIMIZERS[2:])
LATER = (*(("mt", "long", long, half) for half in HALVES), ("mt", "beta", betas), ("mt", "momentum", momentum),
         *(("lm", "long", long, half) for half in HALVES), ("mt", "equal memory", equal_memory),
         ("mt", "equal-time", equal_time), ("lm", "beta", betas))


def phase_sweeps(task: str, part: str, *args) -> list[str]:
    """The sweeps (record folders) a later phase's runs go to."""
    if part == "long":
        return [f"{task}_{optim}_long" for optim in args[0]]
    if part in ("beta", "momentum"):
        return [f"{task}_sm3_{part}"]
    return [f"{task}_{optim}_{part.replace(' ', '_').replace('-', '_')}" for optim in EQUAL_MEMORY]


def two_lanes(stages: list[list[float]]) -> float:
    """When the last phase ends: each stage's phases (their minutes) taken in order by whichever of two lanes
    frees first, as ``_side_by_side`` does; a stage starts once the one before has ended."""
    end = 0.0
    for phases in stages:
        lanes = [end, end]
        for minutes in phases:
            lanes[lanes.index(min(lanes))] += minutes
        end = max(lanes)
    return end


def phase_minutes(record: Path, seconds=wall_seconds) -> tuple[tuple[str, str] | None, list[tuple[str, float | None]],
                                                             list]:
    """(the machine whose pace counts, [(tuning phase, minutes)], [(later phase, minutes)]): each phase's runs in
    one-core minutes at the pace of the machine that ran most of the record (None where it cannot be counted);
    ``seconds(task, summary)``: a run's seconds, by default its wall seconds."""
    machine, paced = at_pace(record, seconds=seconds)

    def minutes(sweeps: list[str]) -> float | None:
        seconds = [t for sweep in sweeps for t in paced.get(sweep, [])]
        return None if None in seconds else sum(seconds) / 60

    return (machine, [(f"{task} tune {optim}", minutes([f"{task}_{optim}"])) for task, optim in TUNING],
            [(_phase_name(task, part, args), minutes(phase_sweeps(task, part, *args)))
             for task, part, _, *args in LATER])


def seconds_now(step_ratio: dict[str, float], task: str, summary: dict) -> float:
    """A recorded run's wall seconds had its training steps (train_seconds: the steps alone) taken
    ``step_ratio[task]`` of their time, its evaluations and start as they were; a run that already stepped as
    train.py steps now (its summary says ``dropout_kernel``) as it is."""
    wall = summary.get("wall_seconds", 0.0)
    if "dropout_kernel" in summary:
        return wall
    return wall - min(summary.get("train_seconds", 0.0), wall) * (1 - step_ratio[task])


def projection(record: Path, step_bench: Path = STEP_BENCH) -> list[str]:
    """The report's lines on how long one pass of the study takes: each phase's runs at one machine's pace, and
    when two lanes taking them in the study's order end; with ``step_bench`` (scripts/bench_study_step.py's
    step ratios), also with train.py's step as it is now."""
    machine, tuning, later = phase_minutes(record)
    if machine is None or any(m is None for _, m in tuning + later):
        return []
    columns = [[m for _, m in tuning + later]]
    bench = json.loads(step_bench.read_text()) if step_bench.exists() else None
    if bench is not None:
        _, tuning_k, later_k = phase_minutes(record, functools.partial(seconds_now, bench["step_ratio"]))
        columns.append([m for _, m in tuning_k + later_k])
        if columns[1] == columns[0]:  # every run already stepped as now
            bench, columns = None, columns[:1]
    ends = [two_lanes([column[:len(tuning)], column[len(tuning):]]) for column in columns]
    lines = [f"One pass of this protocol, from the record: each phase's runs in one-core minutes at the pace of the "
             f"{machine[0]} ({machine[1]}), and when two lanes taking the phases in the study's order (tuning first, "
             "then the rest) end. The runs alone: each launch's start, the momentum trace and equal time's "
             "step timing come on top."]
    if bench is not None:
        lines[0] += (" Since the record's runs, train.py's step has become faster without changing a number: "
                     "dropout masks from trainer/bernoulli.py's kernel (torch's own draws), and no discarded "
                     "log-likelihood beside the training loss. The last column takes each run's training steps at "
                     f"the step-time ratio `scripts/bench_study_step.py` measured ({bench['cpu']}, {bench['precision']}"
                     "; " + ", ".join(f"{task} {r:.3f}" for task, r in bench["step_ratio"].items()) +
                     "), its evaluations and start as recorded.")
    header = ["phase", "one-core minutes"] + (["with today's step"] if bench is not None else [])
    lines += ["", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    names = [name for name, _ in tuning + later]
    lines += ["| " + " | ".join([name, *(f"{column[i]:.1f}" for column in columns)]) + " |"
              for i, name in enumerate(names)]
    lines += ["| all runs | " + " | ".join(f"{sum(column):.1f}" for column in columns) + " |",
              "| **two lanes, start to end** | " + " | ".join(
                  f"**{end:.1f}** (half the runs: {sum(column) / 2:.1f})" for end, column in zip(ends, columns)) + " |",
              ""]
    return lines


def _phase_name(task: str, part: str, args: tuple) -> str:
    return " ".join([task, part, *("+".join(a) for a in args)])


def run_study(tasks: list[str], parts: list[str], lanes: int = 1) -> None:
    """Tuning first (every other part starts from its best settings), then the other parts; ``lanes`` phases
    run side by side, each launch with ``1/lanes`` of the cores (tiny models use two one-thread runs better
    than one two-thread run). Equal memory belongs to the tune part but runs with the later ones."""
    global THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    THREADS = max(1, cores // lanes) if lanes > 1 else None
    if THREADS is not None:
        import torch

        torch.set_num_threads(THREADS)  # equal-time measures seconds a step in this process
    start = time.time()
    try:
        _run_phases(tasks, parts, lanes)
    finally:
        _add_time(WALL, time.time() - start)


def _run_phases(tasks: list[str], parts: list[str], lanes: int) -> None:
    later = LATER if lanes > 1 else LATER[::-1]  # one lane: the cheap parts first, as a stopped study has most
    tuning = [(tune_optimizer, task, optim) for task, optim in TUNING if task in tasks and "tune" in parts]
    rest = [(timed, _phase_name(task, part, args), fn, task, *args) for task, part, fn, *args in later
            if task in tasks and (part.replace(" ", "-") in parts or (part == "equal memory" and "tune" in parts))]
    _side_by_side(tuning, lanes)
    if tuning:
        for task in tasks:
            write_best(task)
    _side_by_side(rest, lanes)


def _side_by_side(phases: list, lanes: int) -> None:
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        for future in [pool.submit(*phase) for phase in phases]:
            future.result()


def main() -> None:
    global RUNS, RECORD, BEST, PRECISION
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    parser.add_argument("--report", action="store_true", help="only redraw the report from the runs' records")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "study")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the runs go (default multirun/study)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (smoke tests)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="trainer.precision of every run "
                        "(default: the record's, so that a continued study keeps one; auto for a new record)")
    parser.add_argument("--lanes", type=int, default=2, help="parts run side by side (default 2: one per core of "
                        "a 2-core machine; each run gets cores/lanes threads, its output in multirun/study/logs/)")
    args = parser.parse_args()
    RUNS, RECORD, BEST = args.runs.resolve(), args.out.resolve() / "runs", args.out.resolve() / "best.json"
    EXTRA[:] = args.extra
    if not args.report:
        restored = restore(RECORD, RUNS)
        if restored:
            print(f"continuing: {restored} finished runs restored from {RECORD}")
        PRECISION = record_precision(RECORD) if args.precision is None else (
            None if args.precision == "auto" else args.precision)
        if PRECISION:
            print(f"precision: every run takes trainer.precision={PRECISION}"
                  + (", as the recorded runs did" if args.precision is None else "") + _emulated(PRECISION))
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            run_study(args.tasks, args.part, max(1, args.lanes))
        except Stopped:
            archive(RUNS, RECORD)
            raise SystemExit("study: stopped; the finished runs and each phase's time so far are in "
                             f"{RECORD}: rerun the same command to continue")
    if RUNS.is_dir():
        archive(RUNS, RECORD)
    print(f"report: {write_report(RECORD, args.out, projection(RECORD))}")


if __name__ == "__main__":
    main()
