"""What the study (scripts/study.py runs it, scripts/study_report.py writes it up) holds fixed: its tasks,
optimizers, grids and protocol, and how a run is judged. Both import this; neither imports the other's
internals."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from scripts.compare import Job
from trainer.tasks import LanguageModelTask, TranslationTask

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("adam", "adagrad", "adafactor", "sm3")
TASKS = ("mt", "lm")
KIND = {"mt": TranslationTask, "lm": LanguageModelTask}  # what judges a run: the trainer's own tasks
STEPS = {"mt": 600, "lm": 300}  # conf/experiment/study/<task>.yaml
SEEDS = (1, 2)
GRID_WARMUP = 0.05  # schedule.warmup_fraction of the grids (conf/experiment/study/<task>.yaml)
WARMUPS = (0.02, 0.10)  # SM3's, tried at its best setting
EQUAL_MEMORY = ("sm3", "adafactor")  # besides Adam, whose budget it is
WIDTHS = (128, 144, 160, 176, 192, 208, 224, 240, 256)  # d_model candidates (d_ff = 4 d_model)
MAX_EXTENSIONS = 2
HORIZON = 4  # the long part: this many times each task's steps
BETAS = (0.9, 0.99, 0.999)  # SM3's exponential moving average, besides beta 0
BETA_LR_DIVISORS = (1, 4, 16)  # an EMA does not shrink its steps as a sum does: lower learning rates too
MOMENTUM_WARMUPS = (0.2, 0.4)  # momentum 0.9 at its best learning rate, with longer warm-ups

PROTOCOL = """The protocol, the same for every optimizer, per task (mt: translation, chosen on validation BLEU;
lm: language modelling, chosen on validation perplexity; both of the Polyak-averaged parameters,
what train.py returns to a sweeper). Parts (`--part`):
- **tune**
  1. the learning-rate grid of `experiment=study/<task>_<optim>` (5 values 2x apart; SM3 also
     momentum 0 and 0.9). While the best learning rate (of each momentum, for SM3) sits at an end of
     what was run, one more value 2x beyond it (at most two more), so that the grid brackets the best;
  2. SM3 only: warm-up over 2% and 10% of the steps at its best setting (the grid used 5%);
  3. seeds: the best setting of each optimizer with seeds 1 and 2 (seed 0 is its tuning run);
  4. mt only, equal memory: the memory of Adam's run (parameters, gradients and optimizer state in
     bytes) is the budget; SM3 and Adafactor (the two whose state is a few vectors) each train the
     widest model that fits in it, at their tuned setting, with seeds 0, 1 and 2. Adagrad (state as
     large as the parameters) is not run there.

  The best settings go to `best.json`, which the other parts start from.
- **momentum** (mt): scripts/study_momentum.py traces SM3's first 150 steps at momentum 0 and 0.9
  (loss, update size per kind of parameter, accumulators) and checks the fused kernel against the default
  path and the float64 reference on 200 steps of the model's own gradients; then momentum 0.9 at its best
  learning rate and 2x it, each with warm-ups over 20% and 40% of the steps (and 5%, the grid's: tune's runs);
  the best of those at 4x the steps.
- **beta**: SM3's best setting with beta 0.9, 0.99 and 0.999 (an exponential moving average instead of a
  sum), each at the best learning rate, 1/4 and 1/16 of it (4x lower while the best is the lowest, at most two more);
  the best of each beta with seeds 0, 1 and 2, against beta 0's (the tune part's seeds of SM3's best).
- **long**: 4x the steps (2400 mt, 1200 lm): each optimizer at its best learning rate and one grid step
  (2x) each side, seed 0, and while the best sits at an end, one more 2x beyond it (at most two more, as in
  tuning); the best of those with seeds 1 and 2. Valid and test are evaluated along the way.
- **equal-time** (mt): Adam at width 128 and SM3 and Adafactor at their equal-memory widths get the same
  training time: each trains `600 * (Adam's seconds a step) / (its seconds a step)` steps, the seconds
  measured side by side in one process; seeds 0, 1 and 2 (Adam's 600 steps: its tuned runs, not run again)."""


def grid(task: str, optim: str) -> dict[str, list[float]]:
    path = ROOT / "conf" / "experiment" / "study" / f"{task}_{optim}.yaml"
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    return {key: [float(v) for v in str(values).split(",")] for key, values in params.items()}


def score(job: Job, task: str) -> float:
    """The selection value, higher is better: the trainer's own (``Task.selection_value``); -inf for a run
    that failed or diverged."""
    try:
        value = KIND[task].selection_value(job.summary or {})
    except (KeyError, TypeError):  # no summary yet, or a value written as null
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def setting(job: Job) -> dict[str, float]:
    """The swept values of a job: learning rate, momentum, beta, warm-up fraction, steps and seed."""
    optim, schedule, trainer = (job.config.get(k, {}) for k in ("optim", "schedule", "trainer"))
    return {"optim.lr": optim.get("lr"), "optim.momentum": optim.get("momentum"), "optim.beta": optim.get("beta"),
            "schedule.warmup_fraction": schedule.get("warmup_fraction"),
            "trainer.max_steps": trainer.get("max_steps"), "trainer.seed": trainer.get("seed")}


def same_setting(a: Job, b: Job) -> bool:
    """Whether two runs differ in their seed at most (the swept values and the model width)."""
    def key(job):
        return ({k: v for k, v in setting(job).items() if k != "trainer.seed"}, job.config.get("model", {}).get("d_model"))
    return key(a) == key(b)


def momentum_grid_runs(jobs: list[Job], lrs) -> list[Job]:
    """The tune part's seed-0 runs of momentum 0.9 at the grid's warm-up and one of ``lrs``: the momentum part's
    runs at the paper's warm-up, which it does not run again."""
    return [j for j in jobs if j.config and setting(j)["optim.momentum"] == 0.9 and setting(j)["trainer.seed"] == 0
            and setting(j)["schedule.warmup_fraction"] == GRID_WARMUP and not setting(j)["optim.beta"]
            and any(math.isclose(setting(j)["optim.lr"], x, rel_tol=1e-4) for x in lrs)]


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
