"""docs/study/: the tables and plots of the study's runs (scripts/study.py makes them; this reads them).

    uv run python scripts/study.py --report     # redraw from multirun/study
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from scripts.compare import Job, _save, draw_seed_bands, find_jobs, fmt_mean_std, mean_std, seeds_table
from scripts.study_protocol import (BETAS, HORIZON, KIND, OPTIMIZERS, PROTOCOL, STEPS, TASKS, footprint,
                                    momentum_grid_runs, same_setting, score, setting)

MIB = 2**20
TASK_TITLE = {"mt": "Translation (data=builtin_sentences, transformer_tiny, 600 steps of 1k tokens)",
              "lm": "Language modelling (data=builtin_lm, transformer_lm_tiny, 300 steps of 1k tokens)"}
METRIC = {task: (kind.metric, kind.higher_is_better) for task, kind in KIND.items()}
METRIC_NAME = {kind.metric: kind.metric_label for kind in KIND.values()}  # "bleu": "BLEU", ...


def _jobs(runs: Path, name: str) -> list[Job]:
    return [j for j in find_jobs(runs / name) if j.config] if (runs / name).is_dir() else []


def _key(job: Job, optim: str) -> str:
    s = setting(job)
    parts = [f"lr {s['optim.lr']:g}"]
    if optim == "sm3":
        parts.append(f"momentum {s['optim.momentum']:g}")
        if s["optim.beta"]:
            parts.append(f"beta {s['optim.beta']:g}")
    parts.append(f"warm-up {s['schedule.warmup_fraction']:g}")
    return f"{optim}: " + ", ".join(parts)


def _value(job: Job, metric: str, suffix: str = "_averaged", split: str = "valid") -> float | None:
    """The summary's value (NaN if not finite), None where the summary lacks it."""
    value = (job.summary or {}).get(f"{split}_{metric}{suffix}")
    if value is None:
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.1e}"


def best_groups(runs: Path, task: str, suffix: str = "") -> dict[str, list[Job]]:
    """Per optimizer: the jobs (every seed) of its best seed-0 setting, under a readable key."""
    groups = {}
    for optim in OPTIMIZERS:
        jobs = _jobs(runs, f"{task}_{optim}{suffix}")
        tuned = [j for j in jobs if setting(j)["trainer.seed"] == 0]
        if not tuned:
            continue
        best = max(tuned, key=lambda j: score(j, task))
        finished = [j for j in jobs if j.summary is not None and same_setting(j, best)]
        if finished:
            groups[_key(best, optim)] = finished
    return groups


def tuning_table(runs: Path, task: str) -> str:
    metric = METRIC[task][0]
    name = METRIC_NAME[metric]
    rows = [["optimizer", "setting", f"valid {name} (averaged)", f"valid {name}", "chosen"], ["---"] * 5]
    for optim in OPTIMIZERS:
        tuned = sorted((j for j in _jobs(runs, f"{task}_{optim}") if setting(j)["trainer.seed"] == 0),
                       key=lambda j: tuple(setting(j)[k] or 0 for k in ("optim.momentum", "schedule.warmup_fraction",
                                                                           "optim.lr")))
        if not tuned:
            continue
        best = max(tuned, key=lambda j: score(j, task))
        for job in tuned:
            cells = ([_fmt(_value(job, metric)), _fmt(_value(job, metric, ""))] if job.summary is not None
                     else [job.status] * 2)
            rows.append([optim, _key(job, optim).split(": ", 1)[1], *cells, "**best**" if job is best else ""])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def draw_lr(runs: Path, task: str, path: Path) -> Path:
    """Validation metric (averaged parameters) against the learning rate, one line per optimizer
    (per momentum for SM3); diverged runs are marked at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, higher = METRIC[task]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for optim in OPTIMIZERS:
        jobs = [j for j in _jobs(runs, f"{task}_{optim}") if setting(j)["trainer.seed"] == 0
                and setting(j)["schedule.warmup_fraction"] == 0.05]
        lines = {}
        for job in jobs:
            label = optim + (f" momentum {setting(job)['optim.momentum']:g}" if optim == "sm3" else "")
            value = _value(job, metric)
            lines.setdefault(label, []).append((setting(job)["optim.lr"], math.nan if value is None else value))
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    if metric == "ppl":
        ax.set_yscale("log")
    ax.set(xlabel="peak learning rate", ylabel=f"validation {METRIC_NAME[metric]} (averaged parameters)",
           title=f"{task}: learning-rate sweeps, seed 0 ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def equal_memory_section(runs: Path, out: Path, task: str = "mt") -> list[str]:
    plan_path = runs / f"{task}_equal_memory.json"
    if not plan_path.exists():
        return []
    plan = json.loads(plan_path.read_text())
    metric = METRIC[task][0]
    name = METRIC_NAME[metric]
    base = best_groups(runs, task)
    wide = best_groups(runs, task, "_equal_memory")
    rows = [["optimizer, setting", "d_model", "parameters", "params + grads + state MiB", "seeds",
             f"test {name} (averaged)", "training s", "tokens/s"], ["---"] * 8]
    points = []  # (label, MiB, mean, std)
    for groups, tag in ((base, ""), (wide, " (equal memory)")):
        for key, group in groups.items():
            optim = key.split(":")[0]
            if optim not in plan:
                continue
            job = group[0]
            width = job.config["model"]["d_model"]
            momentum = setting(job)["optim.momentum"] if optim == "sm3" else 0.0
            mib = footprint(optim, momentum or 0.0, width, job.summary["vocab_size"])[1] / MIB
            values = [_value(j, metric, split="test") for j in group]
            rows.append([key + tag, str(width), f"{job.summary['parameters'] / 1e6:.2f}M", f"{mib:.1f}",
                         str(len(group)), fmt_mean_std(values),
                         fmt_mean_std([j.summary.get("train_seconds") for j in group], 0),
                         fmt_mean_std([j.summary.get("tokens_per_second") for j in group], 0)])
            points.append((optim + tag, mib, *mean_std(values)))
    lines = [f"Budget: {plan['budget_bytes'] / MIB:.1f} MiB of parameters, gradients and optimizer state "
             "(Adam's tuned run, `sm3.optimizer_state_bytes`); each optimizer trains the widest "
             "`transformer_tiny` (d_ff = 4 d_model) that fits, at its tuned setting.", "",
             "\n".join("| " + " | ".join(r) + " |" for r in rows), "",
             *machines_note([j for groups in (base, wide) for g in groups.values() for j in g])]
    compared = {k + " (equal memory)": v for k, v in wide.items()}
    compared.update({k: v for k, v in base.items() if k.startswith("adam")})
    for x, file in (("step", f"{task}_equal_memory_steps.png"), ("train_seconds", f"{task}_equal_memory_time.png")):
        draw_seed_bands(compared, metric, name, out / file, x=x)
        lines += [f"![{file}]({file})", ""]
    lines += [f"![{task}_memory.png]({_draw_memory(points, name, out / f'{task}_memory.png').name})", ""]
    return lines


def _machine(summary: dict) -> tuple[str, str]:
    """(CPU, precision) a run's summary names; runs from before summary.json named the precision were float32."""
    return summary.get("cpu", "CPU not recorded"), summary.get("precision", "float32")


def machines_note(jobs: list[Job]) -> list[str]:
    """A warning line where these runs' seconds come from more than one kind of machine or precision."""
    machines = sorted({", ".join(_machine(j.summary)) for j in jobs if j.summary})
    if len(machines) < 2:
        return []
    return [f"These runs' seconds come from more than one machine ({'; '.join(machines)}): compare seconds only "
            "between runs of one machine (summary.json names it). The equal-time page measured its steps side by "
            "side in one process.", ""]


def _draw_memory(points: list, name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, mib, mean, std in points:
        ax.errorbar([mib], [mean], yerr=[std or 0.0], fmt="o", capsize=4, label=label)
    ax.set(xlabel="parameters + gradients + optimizer state (MiB)", ylabel=f"test {name} (averaged parameters)",
           title="Memory against quality (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _table(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [rows[0], ["---"] * len(rows[0]), *rows[1:]]) + "\n"


def _image(lines: list[str], path: Path) -> None:
    lines += [f"![{path.name}]({path.name})", ""]


def runs_table(jobs: list[Job], task: str, optim: str = "sm3") -> str:
    """One row per run: its setting, steps, seed and validation and test metric (averaged parameters)."""
    metric = METRIC[task][0]
    name = METRIC_NAME[metric]
    rows = [["setting", "steps", "seed", f"valid {name} (averaged)", f"test {name} (averaged)"]]
    for job in sorted(jobs, key=lambda j: tuple(setting(j)[k] or 0 for k in (
            "trainer.max_steps", "optim.beta", "optim.lr", "schedule.warmup_fraction", "trainer.seed"))):
        s = setting(job)
        rows.append([_key(job, optim).split(": ", 1)[1], str(s["trainer.max_steps"]), str(s["trainer.seed"]),
                     _fmt(_value(job, metric)), _fmt(_value(job, metric, split="test"))])
    return _table(rows)


def _settings_groups(jobs: list[Job], task: str, optim: str) -> dict[str, list[Job]]:
    """Finished jobs grouped by setting (all but the seed), under a readable key."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.summary is not None:
            groups.setdefault(f"{_key(job, optim)}, {setting(job)['trainer.max_steps']} steps", []).append(job)
    return groups


def draw_momentum(trace: dict, path: Path) -> Path:
    """Training loss and update RMS / lr (attention weights) over the first steps, per traced setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, step_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in trace["traces"]:
        label = f"lr {t['lr']:g}, momentum {t['momentum']:g}, warm-up {t['warmup_fraction']:g}"
        steps = [r["step"] for r in t["steps"]]
        loss_ax.plot(steps, [r["loss"] for r in t["steps"]], label=label)
        step_ax.plot(steps, [r["update_rms_over_lr"]["attention"] for r in t["steps"]], label=label)
    loss_ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    step_ax.set(xlabel="step", ylabel="RMS(update) / lr, attention weights", yscale="log",
                title="Size of the step SM3 takes, per unit of learning rate")
    for ax in (loss_ax, step_ax):
        ax.grid(alpha=0.3)
    step_ax.legend(fontsize=7)
    return _save(fig, path)


def momentum_section(runs: Path, out: Path) -> list[str]:
    path = runs / "momentum.json"
    if not path.exists():
        return []
    trace = json.loads(path.read_text())
    marks = (1, 10, 30, 60, 150)
    rows = [["setting", *(f"step {m}: loss, step/lr (attn, ffn)" for m in marks)]]
    for t in trace["traces"]:
        by_step = {r["step"]: r for r in t["steps"]}
        cells = []
        for m in marks:
            r = by_step.get(m)
            cells.append("–" if r is None else f"{r['loss']:.2f}, {r['update_rms_over_lr']['attention']:.3f}, "
                                                f"{r['update_rms_over_lr']['feed-forward']:.3f}")
        rows.append([f"lr {t['lr']:g}, momentum {t['momentum']:g}, warm-up {t['warmup_fraction']:g}", *cells])
    lines = ["`scripts/study_momentum.py` (seed 0, the study's translation run, its first steps). step/lr is the RMS "
             "of a step's parameter change over the learning rate of that step: the size of `u` (momentum 0) or "
             "`m` (momentum 0.9) in the README's pseudocode.", "", _table(rows)]
    _image(lines, draw_momentum(trace, out / "mt_momentum_trace.png"))
    p = trace["paths"]
    lines += [f"The momentum path on the model's own gradients: {p['steps']} steps of the {p['parameters'] / 1e6:.2f}M-"
              f"parameter model at lr {p['lr']:g}, momentum {p['momentum']:g}, one gradient stream fed to each "
              "path; the largest parameter difference relative to the largest parameter:", "",
              _table([["fused vs default path", "fused vs float64 reference", "default vs float64 reference"],
                      [f"{p['fused_vs_default']:.1e}", f"{p['fused_vs_reference']:.1e}",
                       f"{p['default_vs_reference']:.1e}"]])]
    jobs = _jobs(runs, "mt_sm3_momentum")
    if jobs:  # with the grid's warm-up, tune's runs
        jobs += momentum_grid_runs(_jobs(runs, "mt_sm3"), {setting(j)["optim.lr"] for j in jobs})
        lines += ["Momentum 0.9, full runs (warm-up 0.05: the tune part's runs):", "", runs_table(jobs, "mt")]
    return lines


def beta_section(runs: Path, out: Path, task: str) -> list[str]:
    jobs = _jobs(runs, f"{task}_sm3_beta")
    if not jobs:
        return []
    jobs += next((g for k, g in best_groups(runs, task).items() if k.startswith("sm3")), [])  # beta 0: tune's
    metric = METRIC[task][0]
    name = METRIC_NAME[metric]
    seeded = [j for j in jobs if setting(j)["trainer.seed"] == 0]
    groups = {k: g for k, g in _settings_groups(jobs, task, "sm3").items() if len(g) > 1}
    lines = [f"SM3's tuned setting with beta in (0, {', '.join(map(str, BETAS))}); seed 0:", "",
             runs_table(seeded, task), "The best of each beta over seeds:", "", seeds_table(groups, metric, name)]
    _image(lines, draw_seed_bands(groups, metric, name, out / f"{task}_beta.png"))
    return lines


def long_section(runs: Path, out: Path, task: str, best: dict) -> list[str]:
    """4x the steps: the learning-rate check, the best over seeds against the tuned 600/300-step result."""
    metric, higher = METRIC[task]
    name = METRIC_NAME[metric]
    rows = [["optimizer", f"{STEPS[task]} steps: test {name} (averaged)", "seeds",
             f"{HORIZON * STEPS[task]} steps: rates run", "best", f"test {name} (averaged)", "seeds"]]
    groups, checks = {}, []
    for optim in OPTIMIZERS:
        jobs = _jobs(runs, f"{task}_{optim}_long")
        if not jobs:
            continue
        checks += [j for j in jobs if setting(j)["trainer.seed"] == 0]
        top = max((j for j in jobs if setting(j)["trainer.seed"] == 0), key=lambda j: score(j, task))
        group = [j for j in jobs if j.summary is not None and _key(j, optim) == _key(top, optim)]
        groups[_key(top, optim)] = group
        short = best.get(task, {}).get(optim, {})
        mean, std = short.get("test", [None, None])
        rows.append([optim, "–" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}"),
                     str(short.get("seeds", "–")),
                     ", ".join(sorted({f"{setting(j)['optim.lr']:g}" for j in jobs if j.summary}, key=float)),
                     f"{setting(top)['optim.lr']:g}",
                     fmt_mean_std([_value(j, metric, split="test") for j in group]), str(len(group))])
    if not groups:
        return []
    lines = [f"The {STEPS[task]}-step column is the tune page's ([{task}_tune.md]({task}_tune.md)); every "
             f"optimizer kept its warm-up fraction, so its warm-up is {HORIZON}x longer in steps.", "", _table(rows),
             *machines_note([j for g in groups.values() for j in g] + checks),
             "Every run (the learning-rate check is seed 0):", ""]
    for optim in OPTIMIZERS:
        jobs = [j for j in checks if j.path.parent.name == f"{task}_{optim}_long"]
        if jobs:
            lines += [f"{optim}:", "", runs_table(jobs, task, optim)]
    _image(lines, draw_seed_bands(groups, metric, name, out / f"{task}_long_test.png", split="test"))
    _image(lines, draw_seed_bands(groups, metric, name, out / f"{task}_long_test_time.png", x="train_seconds",
                                  split="test"))
    return lines


def equal_time_section(runs: Path, out: Path, task: str = "mt") -> list[str]:
    path = runs / f"{task}_equal_time.json"
    if not path.exists():
        return []
    plan = json.loads(path.read_text())
    metric = METRIC[task][0]
    name = METRIC_NAME[metric]
    rows = [["optimizer", "d_model", "params + grads + state MiB", "s a step (side by side)", "steps", "seeds",
             f"test {name} (averaged)", "training s"]]
    # Adam's runs are its tuned ones: the budget's width, STEPS steps (scripts/study.py's equal_time)
    adam = next((g for k, g in best_groups(runs, task).items() if k.startswith("adam")), [])
    groups = {}
    for optim in OPTIMIZERS:
        entry = plan.get(optim)
        jobs = adam if optim == "adam" else [j for j in _jobs(runs, f"{task}_{optim}_equal_time") if j.summary]
        if not isinstance(entry, dict) or "steps" not in entry:
            continue
        label = f"{optim} d_model {entry['d_model']}, {entry['steps']} steps"
        groups[label] = jobs
        rows.append([optim, str(entry["d_model"]), f"{entry['bytes'] / MIB:.1f}", f"{entry['seconds_per_step']:.3f}",
                     str(entry["steps"]), str(len(jobs)), fmt_mean_std([_value(j, metric, split="test") for j in jobs]),
                     fmt_mean_std([j.summary.get("train_seconds") for j in jobs], 0)])
    interval = adam[0].config["trainer"].get("eval_interval", "–") if adam else "–"
    lines = [f"Budget: {plan['budget_bytes'] / MIB:.1f} MiB (Adam's run at width 128) and Adam's {STEPS[task]} steps "
             f"of training time. Adam's runs are its tuned ones (the tune part's seeds, evaluated every {interval} "
             "steps; the others every sixth of their steps). Each optimizer's seconds a step were measured in one "
             "process, the three models stepped in turn, so that the machine's drift hit each alike.", "",
             _table(rows)]
    _image(lines, draw_seed_bands(groups, metric, name, out / f"{task}_equal_time.png", x="train_seconds"))
    return lines


def _recorded(runs: Path, sweeps: tuple[str, ...] = ("*",), key: str = "cpu") -> list[str]:
    """The values of ``key`` (the CPU, the precision) that the summaries of these sweeps' runs name."""
    names = set()
    for summary in (s for pattern in sweeps for s in runs.glob(f"{pattern}/*/summary.json")):
        try:
            names.add(json.loads(summary.read_text()).get(key))
        except (OSError, ValueError):
            continue
    return sorted(n for n in names if n)


def wall_seconds(task: str, summary: dict) -> float:
    return summary.get("wall_seconds", 0.0)


def _timed_runs(runs: Path, seconds=wall_seconds) -> dict[tuple[str, str], list[tuple[str, tuple, float]]]:
    """Per machine (CPU, precision): each finished run's (sweep, kind: task, steps, width, ``seconds(task,
    summary)``, by default its wall seconds)."""
    runs_of: dict[tuple[str, str], list[tuple[str, tuple, float]]] = {}
    for sweep in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        for job in _jobs(runs, sweep.name):
            if job.summary is None:
                continue
            task = sweep.name.split("_")[0]
            kind = (task, job.config.get("trainer", {}).get("max_steps"), job.config.get("model", {}).get("d_model"))
            runs_of.setdefault(_machine(job.summary), []).append((sweep.name, kind, seconds(task, job.summary)))
    return runs_of


def at_pace(runs: Path, machine: tuple[str, str] | None = None,
            seconds=wall_seconds) -> tuple[tuple[str, str] | None, dict[str, list]]:
    """Every run's wall seconds (or ``seconds(task, summary)``) at one machine's pace (default: the one that ran
    the most runs), by sweep: its own where it ran there, else the median of that machine's runs of its kind
    (None where it ran none of the kind)."""
    runs_of = _timed_runs(runs, seconds)
    if machine is None:
        machine = max(runs_of, key=lambda m: len(runs_of[m]), default=None)
    return machine, _paced(runs_of, machine)


def _paced(runs_of: dict, machine: tuple[str, str] | None) -> dict[str, list]:
    pace: dict[tuple, list[float]] = {}
    for _, kind, seconds in runs_of.get(machine, []):
        pace.setdefault(kind, []).append(seconds)
    by_sweep: dict[str, list] = {}
    for other, theirs in runs_of.items():
        for sweep, kind, seconds in theirs:
            by_sweep.setdefault(sweep, []).append(
                seconds if other == machine else statistics.median(pace[kind]) if kind in pace else None)
    return by_sweep


def machine_time(runs: Path) -> list[str]:
    """The runs' own wall minutes (summary.json's wall_seconds) summed per CPU and precision: where a study
    continued on another kind of machine, which of its time came from which; and every run at each machine's pace
    (a run of another machine counted as the median of this one's runs of its kind: task, steps, width)."""
    runs_of = _timed_runs(runs)
    if not runs_of:
        return []
    rows = [["CPU", "precision", "runs", "minutes of the runs", "every run at its pace"]]
    for machine, own in sorted(runs_of.items()):
        paced = [t for ts in _paced(runs_of, machine).values() for t in ts]
        rows.append([*machine, str(len(own)), f"{sum(t for *_, t in own) / 60:.1f}",
                     f"{sum(paced) / 60:.1f}" if None not in paced else "–"])
    return ["The runs' own wall time, by the machine that ran them (one run per core; bf16 on a CPU without bf16 "
            "instructions is emulated, and slower than float32 there). The last column counts every run of the "
            "study at that machine's pace (another machine's run as the median of this one's runs of its kind: "
            "task, steps, width; – where it ran no run of some kind): the study's one-core minutes there, so half "
            "of it is the least two lanes take.", "", _table(rows)]


WALL = "study, start to end"  # timings.json: scripts/study.py's own wall time, over the sessions that ran it
KEPT = ("config.yaml", "summary.json", "metrics.jsonl")  # a run's record; its checkpoints stay behind


def archive(runs: Path, record: Path) -> int:
    """Copy every finished run under ``runs`` (its config, summary and metrics) to ``record``, the committed
    copy the report is drawn from (docs/study/runs/); returns how many runs it holds of ``runs``."""
    return copy_runs(runs, record)


def copy_runs(source: Path, target: Path, keep_existing: bool = False) -> int:
    """Copy each finished run's KEPT files from ``source``/<sweep>/<job>/ to ``target``; with ``keep_existing``, a
    job already finished in ``target`` is left as it is. Returns how many runs were copied."""
    copied = 0
    for summary in sorted(source.glob("*/*/summary.json")):
        job = summary.parent
        to = target / job.parent.name / job.name
        if keep_existing and (to / "summary.json").exists():
            continue
        to.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (job / name).exists():
                shutil.copyfile(job / name, to / name)
        copied += 1
    return copied


def _tune_section(runs: Path, out: Path, task: str) -> list[str]:
    if not any((runs / f"{task}_{o}").is_dir() for o in OPTIMIZERS):
        return []
    metric = METRIC[task][0]
    name = METRIC_NAME[metric]
    groups = best_groups(runs, task)
    lines = ["### Best setting of each optimizer, over seeds (mean ± std)", "", seeds_table(groups, metric, name),
             "### Tuning (seed 0)", "", tuning_table(runs, task)]
    _image(lines, draw_lr(runs, task, out / f"{task}_lr.png"))
    _image(lines, draw_seed_bands(groups, metric, name, out / f"{task}_valid.png"))
    _image(lines, draw_seed_bands(groups, metric, name, out / f"{task}_valid_time.png", x="train_seconds"))
    if task == "mt":
        section = equal_memory_section(runs, out, task)
        if section:
            lines += ["### Equal memory", "", *section]
    return lines


# Each part's page, per task: (file stem, title, the globs of the sweeps it draws, its section's lines).
PAGES = (("tune", "Tuning, seeds and equal memory", lambda task: [*(f"{task}_{o}" for o in OPTIMIZERS),
                                                                  f"{task}_*_equal_memory"],
          lambda runs, out, task, best: _tune_section(runs, out, task)),
         ("momentum", "Momentum", lambda task: ["mt_sm3_momentum"],
          lambda runs, out, task, best: momentum_section(runs, out) if task == "mt" else []),
         ("beta", "SM3's beta", lambda task: [f"{task}_sm3_beta"],
          lambda runs, out, task, best: beta_section(runs, out, task)),
         ("long", f"{HORIZON}x the steps", lambda task: [f"{task}_*_long"],
          lambda runs, out, task, best: long_section(runs, out, task, best)),
         ("equal_time", "Equal memory at equal wall time", lambda task: ["mt_*_equal_time"],
          lambda runs, out, task, best: equal_time_section(runs, out) if task == "mt" else []))


def write_report(runs: Path, out: Path, projection: list[str] = ()) -> Path:
    """A page per part and task whose runs are in ``runs`` (a page of a part with no runs here is kept as it
    is: an earlier session drew it), and README.md: the protocol, every page, the phase times (and the lines of
    ``projection``: scripts/study.py's estimate of one pass), the launches."""
    out.mkdir(parents=True, exist_ok=True)
    best_path = out / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    for task in TASKS:
        for stem, title, sweeps, section in PAGES:
            lines = section(runs, out, task, best)
            if lines:
                cpus = _recorded(runs, sweeps(task))
                precisions = _recorded(runs, sweeps(task), "precision") or ["float32"]  # runs before it was recorded
                head = [f"# {title}: {TASK_TITLE[task]}", "",
                        "Drawn by `scripts/study_report.py` from the runs in [runs/](runs/) (" +
                        (", ".join(f"`{c}`" for c in cpus) or "CPU not recorded") + ", " + " and ".join(precisions) +
                        "). The protocol: "
                        "[README.md](README.md).", ""]
                (out / f"{task}_{stem}.md").write_text("\n".join(head + lines))
    lines = ["# The study: SM3 against Adam, Adagrad and Adafactor", "",
             "What the runs show is in [findings.md](findings.md). Each part's tables and plots are on a page of its "
             "own, drawn by `scripts/study_report.py` from the runs' records in [runs/](runs/) (their configs, "
             "summaries and metrics; `scripts/study.py` copies each finished run there). "
             "`uv run python scripts/study.py` runs what the record lacks (nothing, once it is complete) and "
             "redraws the pages, in the record's precision (`--precision` to choose); one part: `--part NAME`; "
             "only redraw: `--report`. Rerun everything from nothing into new folders: `uv run python "
             "scripts/study.py --out docs/study_new --runs multirun/study_new`.", "", PROTOCOL, "", "## Pages", ""]
    for task in TASKS:
        for stem, title, _, _ in PAGES:
            if (out / f"{task}_{stem}.md").exists():
                lines.append(f"- [{task}: {title}]({task}_{stem}.md)")
    lines.append("")
    timings = runs / "timings.json"
    if timings.exists():
        spent = json.loads(timings.read_text())
        wall = spent.pop(WALL, None)
        lines += ["## Time each phase took", "", "Wall minutes, summed over the sessions that ran the phase "
                  "(`timings.json`); with two lanes, two phases ran at once, so the phases sum to about twice the "
                  "study's own time.", "", "| phase | minutes |",
                  "| --- | ---: |", *(f"| {k} | {v / 60:.1f} |" for k, v in spent.items()),
                  f"| all phases | {sum(spent.values()) / 60:.1f} |",
                  *([f"| **the study, start to end** | **{wall / 60:.1f}** |"] if wall is not None else []), ""]
    lines += machine_time(runs) + ["", *projection]
    commands = runs / "commands.log"
    if commands.exists():
        lines += ["## Every launch, in order", "",
                  "`uv run python scripts/study.py` made these (`python` is the project's environment; a finished "
                  "job is skipped when a launch is repeated):", "", "```", *commands.read_text().splitlines(), "```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
