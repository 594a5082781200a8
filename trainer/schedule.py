"""Learning-rate schedules as multipliers of the base lr, applied through LambdaLR.

LambdaLR calls a schedule with the number of steps already taken (0 for the first step). The
schedules here count the step being taken (``step + 1``), so the first step already learns: with
a factor of 0 it would only add squared gradients to SM3's (or Adagrad's) accumulators, which then
shrink every later step, for no update at all.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("quadratic_warmup", "inverse_sqrt", "constant")


def quadratic_warmup(step: int, warmup: int, total: int, cooldown_steps: int = 0) -> float:
    """The SM3 authors' advice: min(1, (t / warmup) ** 2) for step t = step + 1 (1 from step t = warmup on),
    then constant, then an optional linear cool-down towards 0 over the last ``cooldown_steps``."""
    factor = min(1.0, ((step + 1) / warmup) ** 2) if warmup > 0 else 1.0
    if cooldown_steps > 0:
        factor *= min(1.0, max(0.0, (total - step) / cooldown_steps))
    return factor


def inverse_sqrt(step: int, warmup: int) -> float:
    """Vaswani et al.: linear warm-up t / warmup for step t = step + 1, reaching 1 at t = warmup, then
    sqrt(warmup / t)."""
    t = step + 1
    if warmup > 0 and t < warmup:
        return t / warmup
    return math.sqrt(max(warmup, 1) / t)


def build_scheduler(cfg, optimizer, max_steps: int) -> LambdaLR:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_fraction * max_steps)
    if cfg.name == "quadratic_warmup":
        cooldown = round(cfg.cooldown_fraction * max_steps) if cfg.cooldown else 0
        fn = partial(quadratic_warmup, warmup=warmup, total=max_steps, cooldown_steps=cooldown)
    elif cfg.name == "inverse_sqrt":
        fn = partial(inverse_sqrt, warmup=warmup)
    elif cfg.name == "constant":
        fn = lambda step: 1.0  # noqa: E731
    else:
        raise ValueError(f"Unknown schedule.name={cfg.name!r}; valid: {', '.join(SCHEDULES)}")
    return LambdaLR(optimizer, fn)
