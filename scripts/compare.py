"""Compare the jobs of a multirun: one markdown table and three PNG plots.

    python scripts/compare.py multirun/train              # writes comparison.md and *.png there
    python scripts/compare.py multirun/train --out report   # comparison.md and the PNGs in report/

Each job directory holds `config.yaml`, `metrics.jsonl` and `summary.json` (see train.py);
a job that crashed holds `failed.json` ({"error": ...}) and maybe no summary. The table
gives, per job: the overrides that differ between jobs, experiment, optimizer, learning
rate, batch (data.max_tokens x trainer.grad_accum), final test BLEU (or perplexity, for
language models) of the last iterate and of the averaged parameters, optimizer-state and
peak memory in MB, tokens/s, and the status (ok / failed: reason / incomplete).

Jobs that differ only in `trainer.seed` form a setting: a second table gives each setting's test
metric as mean ± standard deviation over its seeds, and `seeds.png` its validation curves, the
mean with a band of ± one standard deviation.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

MB = 2**20


@dataclass
class Job:
    name: str  # the override dirname
    path: Path
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    experiment: Optional[str] = None
    records: list[dict] = field(default_factory=list)
    summary: Optional[dict] = None
    error: Optional[str] = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"failed: {_one_line(self.error)}"
        return "ok" if self.summary is not None else "incomplete"

    def get(self, dotted: str) -> Any:
        """A value of the resolved config; for a job without one, what its overrides say."""
        node: Any = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return self._override(dotted)
            node = node[key]
        return node

    def _override(self, dotted: str) -> Optional[str]:
        wanted = {dotted, dotted[: -len(".name")]} if dotted.endswith(".name") else {dotted}
        return next((o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0].lstrip("+~") in wanted), None)


def _one_line(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def split_overrides(dirname: str) -> list[str]:
    """`a=1,b=[1,2]` -> ['a=1', 'b=[1,2]']: commas inside brackets or quotes belong to the value."""
    parts, depth, quote, current = [], 0, None, ""
    for char in dirname:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [p for p in parts + [current] if p]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _read_records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed job
                continue
    return records


def load_job(path: Path) -> Job:
    job = Job(name=path.name, path=path)
    job.config = _read_yaml(path / "config.yaml") or {}
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml")
    job.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else split_overrides(path.name)
    hydra_cfg = _read_yaml(path / ".hydra" / "hydra.yaml") or {}
    choices = (hydra_cfg.get("hydra") or {}).get("runtime", {}).get("choices", {}) or {}
    job.experiment = choices.get("experiment") or next(
        (o.split("=", 1)[1] for o in job.overrides if o.split("=", 1)[0].lstrip("+~") == "experiment"), None)
    job.records = _read_records(path / "metrics.jsonl")
    if (path / "summary.json").exists():
        try:
            job.summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            job.summary = None
    if (path / "failed.json").exists():
        try:
            job.error = str(json.loads((path / "failed.json").read_text()).get("error", "unknown error"))
        except (json.JSONDecodeError, AttributeError):
            job.error = "unreadable failed.json"
    return job


def find_jobs(root: Path) -> list[Job]:
    """Every sub-directory (hidden ones aside) that looks like a job directory."""
    markers = ("config.yaml", "metrics.jsonl", "summary.json", "failed.json", ".hydra")
    paths = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
             and any((p / m).exists() for m in markers)]
    return [load_job(p) for p in paths]


def short_labels(jobs: list[Job]) -> tuple[dict[str, str], list[str]]:
    """Each job's overrides minus those every job shares, and the shared ones."""
    # Jobs that ran (have a config) define what is shared; a stray hand-made directory does not.
    ran = [j for j in jobs if j.config] or jobs
    common = set.intersection(*(set(split_overrides(j.name)) for j in ran)) if len(ran) > 1 else set()
    labels = {}
    for job in jobs:
        own = [o for o in split_overrides(job.name) if o not in common]
        labels[job.name] = ",".join(own) or job.name or "(defaults)"
    return labels, sorted(common)


def task_of(job: Job):
    """The trainer's task class of a job (what judges it: metric, label, direction), from its model."""
    from trainer.tasks import LanguageModelTask, TranslationTask

    model = str(job.get("model.name") or "")
    return LanguageModelTask if model.startswith("transformer_lm") else TranslationTask


def quality_metric(jobs: list[Job]) -> tuple[str, str]:
    """The (metric, label) of the table: translation's when any job translates, else language modelling's."""
    kinds = {task_of(j) for j in jobs}
    kind = min(kinds, key=lambda k: k.metric != "bleu") if kinds else task_of(Job("", Path(".")))
    return kind.metric, kind.metric_label


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2g}"
    return str(value)


def markdown_table(jobs: list[Job], labels: dict[str, str], metric: str, metric_name: str) -> str:
    header = ["job", "experiment", "optimizer", "lr", "batch (tokens x accum)", f"test {metric_name}",
              f"test {metric_name} (averaged)", "optimizer state MB", "peak memory MB", "tokens/s", "status"]
    rows = [header, ["---"] * len(header)]
    for job in jobs:
        s = job.summary or {}
        optimizer = job.get("optim.name")
        max_tokens, accum = job.get("data.max_tokens"), job.get("trainer.grad_accum")
        state, peak = s.get("optimizer_state_bytes"), s.get("peak_memory_bytes")
        rows.append([
            f"`{labels[job.name]}`", job.experiment or "–", str(optimizer) if optimizer else "–",
            _fmt(job.get("optim.lr"), 4), f"{max_tokens} x {accum or 1}" if max_tokens else "–",
            *_quality(job, metric),
            _fmt(state / MB if state is not None else None), _fmt(peak / MB if peak is not None else None, 0),
            _fmt(s.get("tokens_per_second"), 0), job.status,
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def _quality(job: Job, metric: str) -> list[str]:
    """Test metric of the last iterate and of the averaged parameters; in a sweep mixing translation
    and language modelling, a job of the other kind shows its own metric, named."""
    summary, kind = job.summary or {}, task_of(job)
    unit = "" if kind.metric == metric else f" {kind.metric_label}"
    return [_fmt(summary.get(f"test_{kind.metric}{k}")) + (unit if f"test_{kind.metric}{k}" in summary else "")
            for k in ("", "_averaged")]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = sorted((r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r)
    return [p[0] for p in points], [p[1] for p in points]


def draw_plots(jobs: list[Job], labels: dict[str, str], metric: str, metric_name: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def short(label: str, limit: int = 48) -> str:
        return label if len(label) <= limit else label[: limit - 1] + "…"

    labels = {name: short(label) for name, label in labels.items()}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {job.name: colors[i % len(colors)] for i, job in enumerate(jobs)}
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for job in jobs:
        steps, losses = _series([r for r in job.records if "lr" in r], "loss")
        if steps:
            ax.plot(steps, losses, color=color[job.name], label=labels[job.name],
                    marker="." if len(steps) < 20 else None)
    ax.set(xlabel="step", ylabel="training loss (label-smoothed, per token)", title="Training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for job in jobs:
        for key, style, suffix in ((f"valid_{metric}", "-", ""), (f"valid_{metric}_averaged", "--", " (averaged)")):
            steps, values = _series(job.records, key)
            if steps:
                ax.plot(steps, values, style, color=color[job.name], marker="o", markersize=3,
                        label=labels[job.name] + suffix)
    ax.set(xlabel="step", ylabel=f"validation {metric_name}",
           title=f"Validation {metric_name}: last iterate (solid), averaged (dashed)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric == "ppl":
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    written.append(_save(fig, out / f"{metric}.png"))

    measured = [j for j in jobs if (j.summary or {}).get("optimizer_state_bytes") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.6 * max(len(measured), 2) + 1.5))
    names = [labels[j.name] for j in measured]
    values = [j.summary["optimizer_state_bytes"] / MB for j in measured]
    bars = ax.barh(names, values, color=[color[j.name] for j in measured])
    ax.bar_label(bars, labels=[f"{v:.2f} MB" for v in values], padding=3, fontsize=8)
    ax.set(xlabel="optimizer state (MB)", title="Optimizer memory")
    ax.invert_yaxis()
    ax.set_xlim(0, max(values, default=1) * 1.25 or 1)
    ax.grid(axis="x", alpha=0.3)
    written.append(_save(fig, out / "optimizer_memory.png"))
    return written


def seed_groups(jobs: list[Job]) -> dict[str, list[Job]]:
    """Finished jobs that differ only in trainer.seed, keyed by their overrides without it."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.summary is not None:
            key = ",".join(o for o in split_overrides(job.name) if o.split("=", 1)[0] != "trainer.seed")
            groups.setdefault(key or "(defaults)", []).append(job)
    return groups


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for one value); NaN for no finite value."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_mean_std(values: list[float], digits: int = 2) -> str:
    mean, std = mean_std(values)
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def seeds_table(groups: dict[str, list[Job]], metric: str, metric_name: str) -> str:
    """Per setting: seeds, test metric (averaged parameters, then last iterate) and valid metric as
    mean ± std over the seeds, and tokens/s."""
    header = ["setting", "seeds", f"test {metric_name} (averaged)", f"test {metric_name}",
              f"valid {metric_name} (averaged)", "tokens/s"]
    rows = [header, ["---"] * len(header)]
    for key, group in groups.items():
        column = lambda name: [j.summary.get(name) for j in group]  # noqa: E731
        rows.append([f"`{key}`", str(len(group)), fmt_mean_std(column(f"test_{metric}_averaged")),
                     fmt_mean_std(column(f"test_{metric}")), fmt_mean_std(column(f"valid_{metric}_averaged")),
                     fmt_mean_std(column("tokens_per_second"), 0)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def draw_seed_bands(groups: dict[str, list[Job]], metric: str, metric_name: str, path: Path,
                    x: str = "step", labels: Optional[dict[str, str]] = None, split: str = "valid") -> Path:
    """The `split`'s metric of the averaged parameters against `x` ("step", or "train_seconds" for equal
    wall time): each setting's mean over seeds, with a band of ± one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, group in groups.items():
        curves = [_series_by(job.records, x, f"{split}_{metric}_averaged") for job in group]
        points = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not points:
            continue
        stats = [mean_std([c[p][1] for c in curves]) for p in points]
        xs = [sum(c[p][0] for c in curves) / len(curves) for p in points]  # mean x (seconds differ)
        means = [m for m, _ in stats]
        spread = [s or 0.0 for _, s in stats]
        line, = ax.plot(xs, means, marker="o", markersize=3, label=(labels or {}).get(key, key) + f" ({len(group)} seeds)")
        ax.fill_between(xs, [m - d for m, d in zip(means, spread)], [m + d for m, d in zip(means, spread)],
                        color=line.get_color(), alpha=0.2)
    title = {"valid": "validation", "test": "test"}.get(split, split)
    ax.set(xlabel={"step": "step", "train_seconds": "training time (s, this CPU)"}.get(x, x),
           ylabel=f"{title} {metric_name} (averaged parameters)",
           title=f"{title.capitalize()} {metric_name}: mean over seeds, band ± 1 std")
    if metric == "ppl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _series_by(records: list[dict], x: str, key: str) -> dict[int, tuple[float, float]]:
    """step -> (x, value) of the records that have `key` (x is the step itself, or another field)."""
    return {r["step"]: (r[x], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and "step" in r and x in r}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def compare(root: Path, out: Optional[Path] = None) -> str:
    """Write `comparison.md` and the plots into `out` (default `root`); return the table."""
    jobs = find_jobs(root)
    if not jobs:
        raise SystemExit(f"no job directories under {root}")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    labels, common = short_labels(jobs)
    metric, metric_name = quality_metric(jobs)
    table = markdown_table(jobs, labels, metric, metric_name)
    plots = draw_plots(jobs, labels, metric, metric_name, out)
    lines = [f"# {root.name}: {len(jobs)} jobs", ""]
    if common:
        lines += ["Overrides shared by every job: " + ", ".join(f"`{o}`" for o in common), ""]
    lines.append(table)
    groups = seed_groups(jobs)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["Over seeds (mean ± std):", "", seeds_table(groups, metric, metric_name)]
        plots.append(draw_seed_bands(groups, metric, metric_name, out / "seeds.png"))
    lines += [*(f"![{p.stem}]({os.path.relpath(p, out)})" for p in plots), ""]
    (out / "comparison.md").write_text("\n".join(lines))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="where comparison.md and the PNGs go (default: DIR)")
    args = parser.parse_args()
    print(compare(args.dir, args.out), end="")


if __name__ == "__main__":
    main()
