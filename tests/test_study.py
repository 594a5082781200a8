"""The study (scripts/study.py): every configuration composes, every optimizer gets the same task and
the same kind of grid, and the protocol extends a grid whose best value sits at an end."""

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scripts import study

ROOT = Path(__file__).resolve().parents[1]
STUDY = sorted(f"study/{p.stem}" for p in (ROOT / "conf" / "experiment" / "study").glob("*_*.yaml"))


def test_every_task_has_every_optimizer():
    assert STUDY == [f"study/{t}_{o}" for t in sorted(study.TASKS) for o in sorted(study.OPTIMIZERS)]


@pytest.mark.parametrize("experiment", STUDY)
def test_study_configs_compose_with_their_grid(experiment, compose):
    cfg = compose([f"experiment={experiment}"], hydra_config=True)
    OmegaConf.to_object(cfg.optim)  # typed: a misspelt key or a wrong type fails here
    task, optim = experiment.removeprefix("study/").split("_")
    assert cfg.optim.name.value == optim and cfg.logger.name.value == "none"
    assert cfg.trainer.max_minutes is None and cfg.schedule.warmup_fraction == 0.05
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep)["dir"]  # unresolved: Hydra fills it in at launch
    assert sweep_dir.replace("${hydra:runtime.choices.experiment}", cfg.hydra.runtime.choices.experiment) \
        == f"multirun/{experiment}"
    lrs = study.grid(task, optim)["optim.lr"]
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert len(lrs) >= 5 and all(1.8 <= r <= 2.2 for r in ratios), lrs  # 5 values ~2x apart
    if optim == "sm3":
        assert study.grid(task, optim)["optim.momentum"] == [0.0, 0.9] and cfg.optim.beta == 0.0


@pytest.mark.parametrize("task", study.TASKS)
def test_every_optimizer_gets_the_same_task(task, compose):
    def same(cfg):
        return OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.data), \
            OmegaConf.to_container(cfg.trainer)
    cfgs = [compose([f"experiment=study/{task}_{o}"]) for o in study.OPTIMIZERS]
    assert all(same(c) == same(cfgs[0]) for c in cfgs)
    expected = {"mt": "builtin_sentences", "lm": "builtin"}[task]
    assert cfgs[0].data.name == expected


def _fake_train(monkeypatch, tmp_path, bleu_of):
    """study.launch replaced by jobs that only write what a finished run writes, BLEU from ``bleu_of``."""
    monkeypatch.setattr(study, "RUNS", tmp_path)
    launched = []

    def fake_launch(task, optim, overrides, suffix=""):
        launched.append(overrides)
        values = {k: ",".join(map(str, v)) for k, v in study.grid(task, optim).items()}
        values.update(o.split("=", 1) for o in overrides)
        for lr in values["optim.lr"].split(","):
            for momentum in values.get("optim.momentum", "0").split(","):
                for seed in values.get("trainer.seed", "0").split(","):
                    job = study.sweep_dir(task, optim, suffix) / f"optim.lr={lr},m={momentum},trainer.seed={seed}"
                    job.mkdir(parents=True, exist_ok=True)
                    (job / "config.yaml").write_text(json.dumps({
                        "optim": {"lr": float(lr), "momentum": float(momentum)},
                        "schedule": {"warmup_fraction": 0.05}, "trainer": {"seed": int(seed)}}))
                    bleu = bleu_of(float(lr), float(momentum))
                    (job / "summary.json").write_text(json.dumps({"valid_bleu_averaged": bleu}))

    monkeypatch.setattr(study, "launch", fake_launch)
    return launched


def test_tuning_extends_the_grid_until_it_brackets_the_best(tmp_path, monkeypatch):
    """Validation BLEU peaking at lr 0.0001, below Adam's grid: the protocol runs two more values beyond
    the low end (the most it may), then seeds the best."""
    launched = _fake_train(monkeypatch, tmp_path, lambda lr, m: 50 - 10 * abs(math.log2(lr / 1e-4)))
    study.tune("mt", "adam")
    assert launched == [[], ["optim.lr=0.00025"], ["optim.lr=0.000125"]]
    best = study.best_job("mt", "adam")
    assert study.setting(best)["optim.lr"] == 0.000125  # still at the end: two extensions at most
    study.seeds("mt", "adam")
    assert launched[-1] == ["optim.lr=0.000125", "schedule.warmup_fraction=0.05", "trainer.seed=1,2"]


def test_sm3_brackets_each_momentum(tmp_path, monkeypatch):
    """Momentum 0 peaks inside SM3's grid (0.2), momentum 0.9 below it: only momentum 0.9 is extended."""
    launched = _fake_train(monkeypatch, tmp_path,
                           lambda lr, m: 60 - 10 * abs(math.log2(lr / (0.2 if m == 0 else 0.03))))
    study.tune("mt", "sm3")
    # 0.025 beats 0.05 (the grid's end), so 0.0125 too is tried, and then 0.025 is bracketed
    assert launched == [[], ["optim.lr=0.025", "optim.momentum=0.9"], ["optim.lr=0.0125", "optim.momentum=0.9"]]


def test_equal_memory_budget_is_what_adams_run_holds():
    parameters, adam = study.footprint("adam", 0.0, 128, 2000)
    _, sm3 = study.footprint("sm3", 0.0, 128, 2000)
    _, sm3_momentum = study.footprint("sm3", 0.9, 128, 2000)
    weights = 4 * parameters
    assert 0 <= adam - 4 * weights < 1000  # parameters, gradients, Adam's two moments (and its step counts)
    assert sm3_momentum - sm3 == weights  # the momentum buffer
    assert 0 < sm3 - 2 * weights < 0.02 * weights  # SM3 without momentum: a few vectors


def test_report_from_runs(tmp_path, monkeypatch):
    """scripts/study_report.py on fake finished runs: the seeds table, the tuning table, the plots."""
    from scripts.study_report import write_report

    _fake_train(monkeypatch, tmp_path, lambda lr, m: 50 - 10 * abs(math.log2(lr / 2e-3)))
    study.tune("mt", "adam")
    study.seeds("mt", "adam")
    for job in (tmp_path / "mt_adam").iterdir():  # curves for the band plots
        (job / "metrics.jsonl").write_text(json.dumps({"step": 600, "train_seconds": 60.0,
                                                       "valid_bleu_averaged": 1.0}) + "\n")
    report = write_report(tmp_path, tmp_path / "out").read_text()
    assert "| `adam: lr 0.002, warm-up 0.05` | 3 |" in report  # the best setting, over 3 seeds
    assert "| adam | lr 0.002, warm-up 0.05 | 50.00 | – | **best** |" in report
    for png in ("mt_lr.png", "mt_valid.png", "mt_valid_time.png"):
        assert f"]({png})" in report and (tmp_path / "out" / png).stat().st_size > 10_000
    assert "The protocol" in report and "lm" not in [line[3:5] for line in report.splitlines()
                                                      if line.startswith("## ")]  # no LM runs, no LM section
