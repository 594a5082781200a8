"""docs/study/: the tables and plots of the study's runs (scripts/study.py writes them; this reads them).

    uv run python scripts/study.py --report     # redraw from multirun/study
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from scripts.compare import Job, _save, draw_seed_bands, find_jobs, fmt_mean_std, mean_std, seeds_table
from scripts.study import KIND, METRIC, OPTIMIZERS, TASKS, footprint, score, setting

MIB = 2**20
TASK_TITLE = {"mt": "Translation (data=builtin_sentences, transformer_tiny, 600 steps of 1k tokens)",
              "lm": "Language modelling (data=builtin_lm, transformer_lm_tiny, 300 steps of 1k tokens)"}
METRIC_NAME = {kind.metric: kind.metric_label for kind in KIND.values()}  # "bleu": "BLEU", ...


def _jobs(runs: Path, name: str) -> list[Job]:
    return [j for j in find_jobs(runs / name) if j.config] if (runs / name).is_dir() else []


def _key(job: Job, optim: str) -> str:
    s = setting(job)
    parts = [f"lr {s['optim.lr']:g}"]
    if optim == "sm3":
        parts.append(f"momentum {s['optim.momentum']:g}")
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
    return "diverged" if not math.isfinite(value) else f"{value:.2f}"


def best_groups(runs: Path, task: str, suffix: str = "") -> dict[str, list[Job]]:
    """Per optimizer: the jobs (every seed) of its best seed-0 setting, under a readable key."""
    groups = {}
    for optim in OPTIMIZERS:
        jobs = _jobs(runs, f"{task}_{optim}{suffix}")
        tuned = [j for j in jobs if setting(j)["trainer.seed"] == 0]
        if not tuned:
            continue
        best = max(tuned, key=lambda j: score(j, task))
        same = [j for j in jobs if {k: v for k, v in setting(j).items() if k != "trainer.seed"}
                == {k: v for k, v in setting(best).items() if k != "trainer.seed"}
                and j.config.get("model", {}).get("d_model") == best.config.get("model", {}).get("d_model")]
        finished = [j for j in same if j.summary is not None]
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
             "\n".join("| " + " | ".join(r) + " |" for r in rows), ""]
    compared = {k + " (equal memory)": v for k, v in wide.items()}
    compared.update({k: v for k, v in base.items() if k.startswith("adam")})
    for x, file in (("step", f"{task}_equal_memory_steps.png"), ("train_seconds", f"{task}_equal_memory_time.png")):
        draw_seed_bands(compared, metric, name, out / file, x=x)
        lines += [f"![{file}]({file})", ""]
    lines += [f"![{task}_memory.png]({_draw_memory(points, name, out / f'{task}_memory.png').name})", ""]
    return lines


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


def write_report(runs: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    import scripts.study as study

    protocol = study.__doc__[study.__doc__.index("The protocol"):study.__doc__.index("Runs live")].strip()
    lines = ["# The study: SM3 against Adam, Adagrad and Adafactor", "",
             "Written by `scripts/study_report.py` from the runs of `scripts/study.py`. Every number is of this "
             "repository's 2-core CPU, float32. Rerun everything: `uv run python scripts/study.py`; redraw this "
             "page from the runs: `uv run python scripts/study.py --report`.", "", protocol.replace("``", "`"), ""]
    for task in TASKS:
        if not any((runs / f"{task}_{o}").is_dir() for o in OPTIMIZERS):
            continue
        metric = METRIC[task][0]
        name = METRIC_NAME[metric]
        groups = best_groups(runs, task)
        lines += [f"## {TASK_TITLE[task]}", "", "### Best setting of each optimizer, over seeds (mean ± std)", "",
                  seeds_table(groups, metric, name), "### Tuning (seed 0)", "", tuning_table(runs, task)]
        for file in (draw_lr(runs, task, out / f"{task}_lr.png").name,
                     draw_seed_bands(groups, metric, name, out / f"{task}_valid.png").name,
                     draw_seed_bands(groups, metric, name, out / f"{task}_valid_time.png", x="train_seconds").name):
            lines += [f"![{file}]({file})", ""]
        if task == "mt":
            section = equal_memory_section(runs, out, task)
            if section:
                lines += ["### Equal memory", "", *section]
    timings = runs / "timings.json"
    if timings.exists():
        spent = json.loads(timings.read_text())
        lines += ["## Time each phase took on this CPU", "", "| phase | minutes |", "| --- | ---: |",
                  *(f"| {k} | {v / 60:.1f} |" for k, v in spent.items()),
                  f"| **all** | **{sum(spent.values()) / 60:.1f}** |", ""]
    commands = runs / "commands.log"
    if commands.exists():
        lines += ["## Every launch, in order", "",
                  "`uv run python scripts/study.py` made these (`python` is the project's environment; a finished "
                  "job is skipped when a launch is repeated):", "", "```", *commands.read_text().splitlines(), "```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
