"""The study (scripts/study.py): every configuration composes, every optimizer gets the same task and
the same kind of grid, and the protocol extends a grid whose best value sits at an end."""

import itertools
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
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


def _fake_train(monkeypatch, tmp_path, bleu_of, best: dict | None = None):
    """study.launch replaced by jobs that only write what a finished run writes, BLEU from
    ``bleu_of(lr, momentum, beta, steps)`` (or of its first two); ``best``: the best.json to start from."""
    monkeypatch.setattr(study, "RUNS", tmp_path)
    monkeypatch.setattr(study, "RECORD", tmp_path)
    monkeypatch.setattr(study, "BEST", tmp_path / "best.json")
    if best is not None:
        (tmp_path / "best.json").write_text(json.dumps(best))
    launched = []
    arity = bleu_of.__code__.co_argcount

    def fake_launch(task, optim, overrides, suffix=""):
        launched.append(overrides)
        values = {k: ",".join(map(str, v)) for k, v in study.grid(task, optim).items()}
        values.update(o.split("=", 1) for o in overrides)
        steps = int(values.get("trainer.max_steps", study.STEPS[task]))
        beta = float(values.get("optim.beta", 0))
        swept = (("optim.lr", ""), ("optim.momentum", "0"), ("schedule.warmup_fraction", "0.05"), ("trainer.seed", "0"))
        for lr, momentum, warmup, seed in itertools.product(*(values.get(k, d).split(",") for k, d in swept)):
            job = study.sweep_dir(task, optim, suffix) / (f"optim.lr={lr},m={momentum},b={beta},w={float(warmup)},"
                                                          f"s={steps},trainer.seed={seed}")
            job.mkdir(parents=True, exist_ok=True)
            (job / "config.yaml").write_text(json.dumps({
                "optim": {"lr": float(lr), "momentum": float(momentum), "beta": beta},
                "schedule": {"warmup_fraction": float(warmup)}, "trainer": {"seed": int(seed), "max_steps": steps}}))
            bleu = bleu_of(*(float(lr), float(momentum), beta, steps)[:arity])
            (job / "summary.json").write_text(json.dumps({"valid_bleu_averaged": bleu, "test_bleu_averaged": bleu}))

    monkeypatch.setattr(study, "launch", fake_launch)
    return launched


BEST = {"mt": {optim: {"overrides": [f"optim.lr={lr}", "schedule.warmup_fraction=0.05"], "steps": 600,
                       "test": [50.0, 1.0], "seeds": 3}
               for optim, lr in (("adam", 0.004), ("adagrad", 0.0125), ("adafactor", 0.08), ("sm3", 0.05))}}
BEST["mt"]["sm3"]["overrides"] += ["optim.momentum=0", "optim.beta=0"]


def test_long_runs_each_optimizer_around_its_tuned_lr_brackets_it_then_seeds_the_best(tmp_path, monkeypatch):
    """At 4x the steps the best learning rate moves up for Adam (1x -> 2x, the end of the check): one more rate
    2x beyond brackets it, and its seeds run at 2x. Every optimizer's tuned rate runs first, then every one's
    neighbours, then the extensions (at most two each, as in tuning), then the seeds."""
    launched = _fake_train(monkeypatch, tmp_path, lambda lr, m, b, steps: 50 - abs(math.log2(lr / 0.008)), BEST)
    study.long("mt")
    tuned, neighbours, extended, seeded = launched[:4], launched[4:8], launched[8:-4], launched[-4:]
    assert all("trainer.max_steps=2400" in o and "trainer.eval_test=true" in o for o in launched)
    assert "optim.lr=0.004" in tuned[0] and "optim.lr=0.05" in tuned[3]
    assert "optim.lr=0.002,0.008" in neighbours[0] and "optim.lr=0.025,0.1" in neighbours[3]
    lrs = [next(o for o in e if o.startswith("optim.lr=")) for e in extended]
    # Adam: 0.016 (then 0.008 is inside); Adagrad: 0.003125; Adafactor and SM3 fall towards 0.008, two steps each
    assert lrs == ["optim.lr=0.016", "optim.lr=0.003125", "optim.lr=0.02", "optim.lr=0.01", "optim.lr=0.0125",
                   "optim.lr=0.00625"]
    assert all("trainer.seed=1,2" in o for o in seeded)
    assert "optim.lr=0.008" in seeded[0]  # Adam's best moved to 2x its tuned rate
    from scripts.study_report import write_report

    report = write_report(tmp_path, tmp_path).read_text()  # best.json, where write_report reads it, is there
    assert "(mt_long.md)" in report
    page = (tmp_path / "mt_long.md").read_text()
    assert page.startswith("# 4x the steps: Translation")
    assert "| adam | 50.00 ± 1.00 | 3 | 0.002, 0.004, 0.008, 0.016 | 0.008 | 50.00 ± 0.00 | 3 |" in page


def test_beta_grid_goes_lower_while_the_lowest_lr_wins(tmp_path, monkeypatch):
    """An EMA (beta > 0) wants a lower rate than a sum: with beta 0.999 the best is below 1/16 of the tuned
    rate, so rates 4x lower are tried until one loses; every beta's best gets seeds, and beta 0 (the tuned
    setting, whose seeds the tune part ran) is not run again. Run again (a continued study), it adds nothing."""
    launched = _fake_train(monkeypatch, tmp_path,
                           lambda lr, m, b, steps: 60 - abs(math.log2(lr / (0.05 if b < 0.99 else 0.0005))), BEST)
    study.betas("mt")
    fixed = ["schedule.warmup_fraction=0.05", "optim.momentum=0", "optim.beta=0.999"]
    assert [*fixed, "optim.lr=0.05,0.0125,0.003125"] in launched
    assert [*fixed, "optim.lr=0.00078125"] in launched and [*fixed, "optim.lr=0.000195313"] in launched
    seeded = [o for o in launched if any(x.startswith("trainer.seed=") for x in o)]
    assert len(seeded) == 3 and all("trainer.seed=1,2" in o for o in seeded)
    assert "optim.lr=0.00078125" in seeded[2]
    once = len(study.jobs_of("mt", "sm3", "_beta"))
    study.betas("mt")
    assert len(study.jobs_of("mt", "sm3", "_beta")) == once
    assert not any("optim.beta=0" in o for o in launched)
    from scripts.study_report import beta_section

    study.tune("mt", "sm3")
    study.seeds("mt", "sm3")
    page = "\n".join(beta_section(tmp_path, tmp_path, "mt"))
    seeds_table = page.split("The best of each beta over seeds:")[1]
    beta0 = [line for line in seeds_table.splitlines() if "momentum 0" in line and "beta" not in line]
    assert len(beta0) == 1 and "| 3 |" in beta0[0], seeds_table  # beta 0: tune's best, its 3 seeds


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
    """Momentum 0 peaks inside SM3's grid (0.05), momentum 0.9 below it: only momentum 0.9 is extended."""
    launched = _fake_train(monkeypatch, tmp_path,
                           lambda lr, m: 60 - 10 * abs(math.log2(lr / (0.05 if m == 0 else 0.007))))
    study.tune("mt", "sm3")
    # 0.00625 beats 0.0125 (the grid's end), so 0.003125 too is tried, and then 0.00625 is bracketed
    assert launched == [[], ["optim.lr=0.00625", "optim.momentum=0.9"], ["optim.lr=0.003125", "optim.momentum=0.9"]]


def test_the_momentum_part_takes_the_papers_warm_up_from_tuning(tmp_path, monkeypatch):
    """Momentum 0.9 with the grid's 5% warm-up at its best rate and 2x it are tune's runs, bitwise the same: the
    momentum part runs the longer warm-ups only, and the best of all six (here a tune run) goes to 4x the steps.
    Where tune lacks one of the rates, the momentum part runs it."""
    launched = _fake_train(monkeypatch, tmp_path, lambda lr, m, b, steps: 60 - abs(math.log2(lr / 1.0)))
    study.tune("mt", "sm3")  # the grid's top, 0.2, then 0.4 and 0.8 (two extensions, the most): 1.6 is not run
    paths = dict(steps=1, parameters=1e6, lr=0.1, momentum=0.9, fused_vs_default=0.0, fused_vs_reference=0.0,
                 default_vs_reference=0.0)
    (tmp_path / "momentum.json").write_text(json.dumps({"traces": [], "paths": paths}))  # not this test's subject
    del launched[:]
    study.momentum("mt")
    fixed = ["optim.momentum=0.9", "optim.beta=0"]
    assert launched[0] == [*fixed, "optim.lr=0.8,1.6", "schedule.warmup_fraction=0.2,0.4"]
    assert launched[1] == [*fixed, "optim.lr=1.6", "schedule.warmup_fraction=0.05"]  # the one tune lacks
    assert launched[2] == ["optim.lr=0.8", "schedule.warmup_fraction=0.05", *fixed, *study.horizon("mt")]
    assert len(launched) == 3
    from scripts.study_report import momentum_section

    page = "\n".join(momentum_section(tmp_path, tmp_path))
    assert "| lr 0.8, momentum 0.9, warm-up 0.05 | 600 | 0 |" in page  # tune's run, on the momentum page


def test_equal_time_takes_adams_runs_from_tuning(tmp_path, monkeypatch):
    """Adam's equal-time runs are its tuned runs (width 128, 600 steps, the same seeds): no equal-time folder of
    Adam's, and the page shows its three tuned seeds. Run alone, without tune's runs (from best.json), the part runs
    Adam's seeds 0, 1 and 2 where tuning would have."""
    launched = _fake_train(monkeypatch, tmp_path, lambda lr, m: 50 - abs(math.log2(lr / 0.004)))
    optims = []
    fake = study.launch
    monkeypatch.setattr(study, "launch", lambda task, optim, *a, **k: (optims.append(optim), fake(task, optim, *a, **k)))
    study.tune("mt", "adam")
    study.seeds("mt", "adam")
    plan = {"budget_bytes": 2**20, "adam": {"d_model": 128, "bytes": 2**20, "overrides": study.best_overrides(
        "mt", "adam"), "seconds_per_step": 0.1, "steps": 600}}
    plan.update({o: {"d_model": 176, "bytes": 2**20, "overrides": [], "seconds_per_step": 0.15, "steps": 400}
                 for o in study.EQUAL_MEMORY})
    (tmp_path / "mt_equal_time.json").write_text(json.dumps(plan))
    del optims[:]
    study.equal_time("mt")
    assert not (tmp_path / "mt_adam_equal_time").exists()
    assert optims == ["adam", *study.EQUAL_MEMORY] and launched[-3] == ["optim.lr=0.004",
                                                                        "schedule.warmup_fraction=0.05",
                                                                        "trainer.seed=1,2"]  # tune's seeds: skipped
    from scripts.study_report import equal_time_section

    page = "\n".join(equal_time_section(tmp_path, tmp_path))
    assert "| adam | 128 | 1.0 | 0.100 | 600 | 3 | 50.00 ± 0.00 |" in page
    shutil.rmtree(tmp_path / "mt_adam")  # --part equal-time alone, from best.json: Adam's runs go where tune's go
    del launched[:]
    study.equal_time("mt")
    assert launched[0] == [*plan["adam"]["overrides"], "trainer.seed=0,1,2"]
    assert "| adam | 128 | 1.0 | 0.100 | 600 | 3 | 50.00 ± 0.00 |" in "\n".join(equal_time_section(tmp_path, tmp_path))


def test_the_later_parts_are_ordered_so_two_lanes_finish_together():
    """On the committed record's runs (at the pace of the machine that ran most of them), the study's order of
    the parts after tuning ends as early as the longest-first order. The order before this test put equal memory
    last: one lane idled ~12 minutes while the other ran it."""
    machine, tuning, later = study.phase_minutes(study.RECORD)
    assert machine is not None and all(m is not None and m > 0 for _, m in tuning + later)
    stages = [[m for _, m in tuning], [m for _, m in later]]
    longest_first = [[m for _, m in tuning], sorted((m for _, m in later), reverse=True)]
    assert study.two_lanes(stages) <= study.two_lanes(longest_first) + 0.5
    assert study.two_lanes([[3, 2, 2, 1], [4, 4]]) == 4 + 4 and study.two_lanes([[5, 1, 1]]) == 5


def test_the_projection_takes_the_runs_training_steps_at_the_measured_step_ratio(tmp_path):
    """The report's one-pass estimate with train.py's step as it is now: each recorded run's steps (train_seconds) at the
    step ratio scripts/bench_study_step.py measured, its evaluations and start as recorded."""
    assert study.seconds_now({"mt": 0.5}, "mt", {"wall_seconds": 100.0, "train_seconds": 80.0}) == 60.0
    # a resumed run: train_seconds counts every session, wall_seconds the last
    assert study.seconds_now({"mt": 0.5}, "mt", {"wall_seconds": 100.0, "train_seconds": 150.0}) == 50.0
    # a run that already stepped as now
    assert study.seconds_now({"mt": 0.5}, "mt", {"wall_seconds": 100.0, "train_seconds": 80.0,
                                                 "dropout_kernel": True}) == 100.0
    ends = {}
    for ratio in (1.0, 0.5):
        bench = tmp_path / f"{ratio}.json"
        bench.write_text(json.dumps({"cpu": "a CPU", "precision": "float32", "step_ratio": {"mt": ratio, "lm": ratio}}))
        row = next(line for line in study.projection(study.RECORD, bench) if "two lanes, start to end" in line)
        ends[ratio] = [float(x) for x in re.findall(r"\*\*([\d.]+)\*\*", row)]
    assert ends[1.0] == ends[0.5][:1]  # ratio 1: the record's own times, and no second column
    assert ends[0.5][0] / 2 < ends[0.5][1] < ends[0.5][0] * 0.6  # the steps at half, evaluation and start as they were
    assert "with today's step" not in "\n".join(study.projection(study.RECORD, tmp_path / "none.json"))


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
    page = (tmp_path / "out" / "mt_tune.md").read_text()
    assert "| `adam: lr 0.002, warm-up 0.05` | 3 |" in page  # the best setting, over 3 seeds
    assert "| adam | lr 0.002, warm-up 0.05 | 50.00 | – | **best** |" in page
    for png in ("mt_lr.png", "mt_valid.png", "mt_valid_time.png"):
        assert f"]({png})" in page and (tmp_path / "out" / png).stat().st_size > 10_000
    assert "The protocol" in report and "(mt_tune.md)" in report
    assert not list((tmp_path / "out").glob("lm_*.md"))  # no LM runs, no LM page


def test_runs_records_are_archived_and_the_report_is_drawn_from_them(tmp_path, monkeypatch):
    """A finished run's config, summary and metrics (not its checkpoints) go to the record; the report drawn
    from the record alone is the report of the runs; a page of a part not in the record is kept as it was."""
    from scripts.study_report import archive, write_report

    _fake_train(monkeypatch, tmp_path / "runs", lambda lr, m: 50 - 10 * abs(math.log2(lr / 2e-3)))
    (tmp_path / "runs").mkdir()
    study.tune("mt", "adam")
    for job in (tmp_path / "runs" / "mt_adam").iterdir():
        (job / "metrics.jsonl").write_text(json.dumps({"step": 600, "valid_bleu_averaged": 1.0}) + "\n")
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "step_600.pt").write_bytes(b"x" * 1000)
    (job / "summary.json").unlink()  # an unfinished run is not archived
    out = tmp_path / "docs"
    (out / "lm_beta.md").parent.mkdir()
    (out / "lm_beta.md").write_text("# SM3's beta: an earlier session's page\n")
    assert archive(tmp_path / "runs", out / "runs") == 4
    assert not list((out / "runs").rglob("checkpoints"))
    assert sorted(p.name for p in next((out / "runs" / "mt_adam").iterdir()).iterdir()) == [
        "config.yaml", "metrics.jsonl", "summary.json"]
    write_report(out / "runs", out)
    from_record = (out / "mt_tune.md").read_text()
    shutil.rmtree(job)  # the unfinished run: the record has the finished ones
    write_report(tmp_path / "runs", tmp_path / "direct")
    assert from_record.split("\n", 4)[4] == (tmp_path / "direct" / "mt_tune.md").read_text().split("\n", 4)[4]
    assert (out / "lm_beta.md").read_text() == "# SM3's beta: an earlier session's page\n"
    assert "(lm_beta.md)" in (out / "README.md").read_text()


@pytest.mark.slow
def test_momentum_paths_agree_on_the_study_models_gradients(cache_dir):
    """The fused kernel, the default path and the float64 reference, fed one stream of the study model's own
    gradients with momentum 0.9: the parameters agree to float32 rounding after 20 steps."""
    from scripts.study_momentum import paths

    result = paths(steps=20, overrides=[f"data.cache_dir={cache_dir}", "data.num_train=2000"])
    assert result["parameters"] > 1_000_000
    assert result["fused_vs_default"] < 1e-5 and result["fused_vs_reference"] < 1e-5
    assert result["default_vs_reference"] < 1e-5


def test_two_lanes_run_the_later_parts_side_by_side_on_a_share_of_the_cores(tmp_path, monkeypatch):
    """--lanes 2: two parts at once (each waits for the other at a barrier, which fails if they run one
    after the other), every phase timed, and each launch given half the cores and its own log."""
    monkeypatch.setattr(study, "RUNS", tmp_path)
    monkeypatch.setattr(study, "RECORD", tmp_path)
    monkeypatch.setattr(study, "THREADS", None)  # run_study sets it; restored afterwards
    meet = threading.Barrier(2, timeout=10)
    ran = []
    monkeypatch.setattr(study, "LATER", tuple((task, part, lambda task, part=part: (meet.wait(), ran.append(part)))
                                              for task, part in (("mt", "long"), ("lm", "long"))))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    study.run_study(["mt", "lm"], ["long"], lanes=2)
    assert sorted(ran) == ["long", "long"] and study.THREADS == 1
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"mt long", "lm long", study.WALL}

    calls = []
    monkeypatch.setattr(study, "_run", lambda command, **kw: calls.append((command, kw)))
    study.launch("mt", "sm3", ["optim.lr=0.1"], suffix="_long")
    (command, kw), = calls
    assert kw["env"]["OMP_NUM_THREADS"] == "1" and kw["stdout"].name == str(tmp_path / "logs" / "mt_sm3_long.log")
    assert "optim.lr=0.1" in command and (tmp_path / "commands.log").read_text().count("optim.lr=0.1") == 1



def test_the_long_part_is_two_halves_of_the_optimizers_so_two_lanes_share_it(tmp_path, monkeypatch):
    """Two lanes split the longest part: the task's long phases cover every optimizer once, in two phases."""
    _fake_train(monkeypatch, tmp_path, lambda lr, m: 50.0, BEST)
    fake, optims = study.launch, []
    monkeypatch.setattr(study, "launch", lambda task, optim, *a, **k: (optims.append(optim), fake(task, optim, *a, **k)))
    monkeypatch.setattr(study, "LATER", tuple(p for p in study.LATER if p[1] == "long"))
    study.run_study(["mt"], ["long"], lanes=2)
    assert sorted(set(optims)) == sorted(study.OPTIMIZERS)  # tuned, neighbours, seeds: 3 each, and extensions
    assert all(optims.count(optim) >= 3 for optim in study.OPTIMIZERS)
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"mt long adam+adagrad",
                                                                         "mt long adafactor+sm3", study.WALL}


def test_tuning_is_a_phase_per_optimizer_so_two_lanes_share_it_and_best_json_comes_before_the_rest(
        tmp_path, monkeypatch):
    """The tune part was one phase per task: translation's ~70 minutes in one lane, the other idle after
    language modelling's ~13. Now each optimizer's grid and seeds are a phase; the first two run at once (a
    barrier fails if they run one after the other); equal memory, which needs every optimizer's best, runs after
    best.json is written."""
    monkeypatch.setattr(study, "RUNS", tmp_path)
    monkeypatch.setattr(study, "RECORD", tmp_path)
    monkeypatch.setattr(study, "THREADS", None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    meet, events = threading.Barrier(2, timeout=10), []
    first_two = {study.TUNING[0][1], study.TUNING[1][1]}
    monkeypatch.setattr(study, "tune", lambda task, optim: (optim in first_two and meet.wait(),
                                                            events.append(f"tune {optim}")))
    monkeypatch.setattr(study, "warmups", lambda task: events.append("warm-up"))
    monkeypatch.setattr(study, "seeds", lambda task, optim: events.append(f"seeds {optim}"))
    monkeypatch.setattr(study, "write_best", lambda task: events.append(f"best {task}"))
    record = {"equal memory": lambda task: events.append("equal memory")}
    monkeypatch.setattr(study, "LATER", tuple((t, p, record.get(p)) for t, p, *_ in study.LATER
                                              if p in ("equal memory", "beta")))
    study.run_study(["mt"], ["tune"], lanes=2)
    assert {f"tune {o}" for o in study.OPTIMIZERS} | {f"seeds {o}" for o in study.OPTIMIZERS} < set(events)
    assert events[-2:] == ["best mt", "equal memory"] and "beta" not in events
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {
        *(f"mt {kind} {o}" for kind in ("tune", "seeds") for o in study.OPTIMIZERS), "mt warm-up sm3",
        "mt equal memory", study.WALL}


def test_a_study_continues_from_its_committed_record_on_another_machine(tmp_path, monkeypatch):
    """The record (docs/study/runs/) is restored where the runs go, so that train.py skips those jobs and the
    study picks up after them; a run already there is left as it is."""
    record, runs = tmp_path / "record", tmp_path / "runs"
    for root, lr, bleu in ((record, 0.004, 60.0), (record, 0.002, 50.0), (runs, 0.002, 51.0)):
        job = root / "mt_adam" / f"optim.lr={lr}"
        job.mkdir(parents=True)
        (job / "config.yaml").write_text(json.dumps({"optim": {"lr": lr}, "schedule": {"warmup_fraction": 0.05},
                                                     "trainer": {"seed": 0, "max_steps": 600}}))
        (job / "summary.json").write_text(json.dumps({"valid_bleu_averaged": bleu, "test_bleu_averaged": bleu}))
    (record / "mt_adam" / "optim.lr=0.004" / "metrics.jsonl").write_text('{"step": 600}\n')
    assert study.restore(record, runs) == 1 and study.restore(record, runs) == 0
    assert (runs / "mt_adam" / "optim.lr=0.004" / "metrics.jsonl").read_text() == '{"step": 600}\n'
    assert json.loads((runs / "mt_adam" / "optim.lr=0.002" / "summary.json").read_text())["valid_bleu_averaged"] == 51
    monkeypatch.setattr(study, "RUNS", runs)
    assert study.setting(study.best_job("mt", "adam"))["optim.lr"] == 0.004


def test_a_stopped_study_keeps_the_time_its_phases_ran_and_stops_its_jobs(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) mid-phase: the running job is passed SIGTERM (train.py checkpoints), the lane stops
    after it, and the phase's time so far is added to timings.json; a phase not yet begun is not timed."""
    monkeypatch.setattr(study, "RUNS", tmp_path)
    monkeypatch.setattr(study, "RECORD", tmp_path)
    monkeypatch.setattr(study, "STOP", threading.Event())
    signals = []

    class Child:
        def send_signal(self, signum):
            signals.append(signum)

    def job(command, **kw):  # the signal arrives while a job runs
        study._CHILDREN.add(Child())
        study._stop(signal.SIGTERM, None)
        study._CHILDREN.clear()
        time.sleep(0.05)

    monkeypatch.setattr(study, "_run", job)
    with pytest.raises(study.Stopped):
        study.timed("mt long", lambda: (study.launch("mt", "adam", ["optim.lr=0.004"]),
                                        study.launch("mt", "adam", ["optim.lr=0.008"])))
    assert signals == [signal.SIGTERM] and study.STOP.is_set()
    assert "optim.lr=0.008" not in (tmp_path / "commands.log").read_text()
    with pytest.raises(study.Stopped):
        study.timed("mt beta", study.launch, "mt", "sm3", [])
    assert list(json.loads((tmp_path / "timings.json").read_text())) == ["mt long"]
    assert json.loads((tmp_path / "timings.json").read_text())["mt long"] >= 0.05


def _record_with(record: Path, precisions: list[str | None]) -> None:
    for i, precision in enumerate(precisions):
        job = record / "mt_adam" / f"optim.lr={i}"
        job.mkdir(parents=True)
        (job / "summary.json").write_text(json.dumps({} if precision is None else {"precision": precision}))


def test_a_continued_study_keeps_the_precision_of_its_record(tmp_path, monkeypatch):
    """A record made under bf16 autocast, continued on a CPU where ``auto`` picks float32: every run is pinned to
    the record's precision, so that its comparisons do not mix the two; a mixed record is refused."""
    assert study.record_precision(tmp_path / "empty") is None
    _record_with(tmp_path / "bf16", ["bf16 autocast", "bf16 autocast"])
    _record_with(tmp_path / "fp32", ["float32", None])  # records from before summary.json named it: float32
    _record_with(tmp_path / "mixed", ["bf16 autocast", "float32"])
    assert study.record_precision(tmp_path / "bf16") == "bf16"
    assert study.record_precision(tmp_path / "fp32") == "fp32"
    with pytest.raises(SystemExit, match="mix precisions.*--precision"):
        study.record_precision(tmp_path / "mixed")
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(study, "RECORD", tmp_path / "runs")
    monkeypatch.setattr(study, "PRECISION", "bf16")
    commands = []
    monkeypatch.setattr(study, "_run", lambda command, **kw: commands.append(command))
    study.launch("mt", "adam", ["optim.lr=0.004"])
    assert commands[0][-2:] == ["optim.lr=0.004", "trainer.precision=bf16"]


@pytest.mark.parametrize("task", study.TASKS)
def test_pinning_the_precision_keeps_a_jobs_directory(task, compose):
    """The pinned precision must not rename the job: train.py skips a recorded run only in its own directory."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    naming = compose([f"experiment=study/{task}_sm3"], hydra_config=True).hydra.job.config.override_dirname

    def dirname(overrides: list[str]) -> str:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return get_overrides_dirname(parsed, list(naming.exclude_keys), naming.item_sep, naming.kv_sep)

    assert dirname(["optim.lr=0.1", "trainer.precision=bf16"]) == dirname(["optim.lr=0.1"]) == "optim.lr=0.1"


def test_out_sends_the_records_of_a_new_study_there(tmp_path, monkeypatch):
    """``--out DIR --runs DIR2`` starts a study elsewhere: its launches are logged and archived under DIR/runs, not
    in the committed record."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    committed = tmp_path / "committed"
    monkeypatch.setattr(study, "RECORD", committed)  # main rebinds these; restored afterwards
    monkeypatch.setattr(study, "RUNS", study.RUNS)
    monkeypatch.setattr(study, "BEST", study.BEST)
    monkeypatch.setattr(study, "PRECISION", None)
    monkeypatch.setattr(study, "_run", lambda command, **kw: None)
    monkeypatch.setattr(study, "run_study", lambda tasks, parts, lanes: study.launch("mt", "adam", []))
    monkeypatch.setattr(study, "write_report", lambda record, to, *projection: to / "README.md")
    monkeypatch.setattr(study.signal, "signal", lambda *a: None)
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(out), "--runs", str(runs)])
    study.main()
    assert "experiment=study/mt_adam" in (out / "runs" / "commands.log").read_text()
    assert study.BEST == out / "best.json" and study.PRECISION is None and not committed.exists()


def test_the_report_sums_the_runs_time_by_the_machine_that_ran_them(tmp_path):
    """A study continued on another kind of CPU: the report says how much of the runs' time each machine gave, and
    what the whole study comes to at each one's pace (the other's runs counted as its median run of that kind)."""
    from scripts.study_report import machine_time

    for name, cpu, steps, seconds in (("a", "AMD EPYC", 600, 120.0), ("b", "AMD EPYC", 600, 60.0),
                                      ("c", "AMD EPYC", 2400, 240.0), ("d", "Intel Xeon", 600, 300.0)):
        job = tmp_path / "mt_adam" / name
        job.mkdir(parents=True)
        (job / "config.yaml").write_text(json.dumps({"trainer": {"max_steps": steps}, "model": {"d_model": 128}}))
        (job / "summary.json").write_text(json.dumps({"cpu": cpu, "precision": "bf16 autocast",
                                                      "wall_seconds": seconds}))
    table = "\n".join(machine_time(tmp_path))
    # the AMD's pace: its own 7 minutes, and the Intel's 600-step run as its median 600-step run (90 s)
    assert "| AMD EPYC | bf16 autocast | 3 | 7.0 | 8.5 |" in table
    assert "| Intel Xeon | bf16 autocast | 1 | 5.0 | – |" in table  # it ran no 2400-step run
    assert machine_time(tmp_path / "none") == []


def test_seconds_from_two_machines_are_flagged(tmp_path):
    """Equal memory's wider runs ran on another CPU than Adam's: its seconds column and time plot say so."""
    from scripts.compare import Job
    from scripts.study_report import machines_note

    def job(cpu, precision="bf16 autocast"):
        return Job(name="run", path=tmp_path, summary={"cpu": cpu, "precision": precision})

    assert machines_note([job("AMD EPYC"), job("AMD EPYC")]) == []
    note = machines_note([job("AMD EPYC"), job("Intel Xeon")])
    assert "AMD EPYC, bf16 autocast; Intel Xeon, bf16 autocast" in note[0]
    assert machines_note([job("AMD EPYC"), job("AMD EPYC", "float32")])


def test_a_launch_whose_jobs_have_all_finished_starts_nothing(tmp_path, monkeypatch):
    """Continuing a complete study used to start train.py once per launch only for it to skip every job (~8 s
    each, ~5 minutes in all): the study names the jobs as Hydra does and launches only when one is unfinished."""
    recorded = ROOT / "docs" / "study" / "runs" / "mt_sm3_long"
    long_check = ["experiment=study/mt_sm3", f"hydra.sweep.dir={recorded}", "schedule.warmup_fraction=0.02",
                  "optim.momentum=0", "optim.beta=0", *study.horizon("mt"), "optim.lr=0.0125,0.05",
                  "trainer.precision=bf16"]
    names = [d.name for d in study.job_dirs(long_check)]
    assert len(names) == 2 and all((recorded / n / "summary.json").exists() for n in names), names

    monkeypatch.setattr(study, "RUNS", tmp_path)
    monkeypatch.setattr(study, "RECORD", tmp_path / "record")
    monkeypatch.setattr(study, "PRECISION", "bf16")
    calls = []
    monkeypatch.setattr(study, "_run", lambda command, **kw: calls.append(command))
    grid = study.job_dirs(["experiment=study/mt_adam", f"hydra.sweep.dir={tmp_path / 'mt_adam'}"])
    assert sorted(d.name for d in grid) == sorted(f"optim.lr={lr:g}" for lr in study.grid("mt", "adam")["optim.lr"])
    for job in grid:
        job.mkdir(parents=True)
        (job / "config.yaml").write_text("trainer:\n  max_steps: 600\n")
        (job / "summary.json").write_text(json.dumps({"step": 600}))
    study.launch("mt", "adam", [])
    assert calls == []
    (grid[0] / "summary.json").write_text(json.dumps({"step": 300}))  # stopped by trainer.max_minutes: goes on
    study.launch("mt", "adam", [])
    assert len(calls) == 1


def test_lanes_compose_configs_at_once():
    """Two lanes naming their jobs at the same moment: Hydra's global state must not see two initialisations."""
    from concurrent.futures import ThreadPoolExecutor

    arguments = [[f"experiment=study/mt_{optim}", f"hydra.sweep.dir=/tmp/{optim}"] for optim in study.OPTIMIZERS * 3]
    with ThreadPoolExecutor(max_workers=4) as pool:
        named = list(pool.map(study.job_dirs, arguments))
    assert [len(dirs) for dirs in named] == [len(study.grid("mt", o)["optim.lr"]) * (2 if o == "sm3" else 1)
                                             for o in study.OPTIMIZERS * 3]
