"""Typed schemas of every config group, registered in Hydra's ConfigStore (`register()`).

YAML files in `conf/` only fill values: a misspelt key or a wrong type fails at start.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from data import DataConfig, LMDataConfig


# Choices as str-valued enums: OmegaConf rejects anything else and lists the valid values.
class ModelName(str, Enum):
    transformer = "transformer"  # encoder-decoder, translation data
    transformer_lm = "transformer_lm"  # decoder-only, language-modelling data


class OptimName(str, Enum):
    sm3 = "sm3"
    adam = "adam"
    adagrad = "adagrad"
    adafactor = "adafactor"
    sgd = "sgd"


class MomentumDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class ScheduleName(str, Enum):
    quadratic_warmup = "quadratic_warmup"
    inverse_sqrt = "inverse_sqrt"
    constant = "constant"


class LoggerName(str, Enum):
    wandb = "wandb"
    none = "none"


class LoggerMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Resume(str, Enum):
    auto = "auto"
    never = "never"


class EvalSplit(str, Enum):
    valid = "valid"
    test = "test"
    both = "both"


class Parallel(str, Enum):
    ddp = "ddp"  # under torchrun: replicas, gradients all-reduced (one process: no wrapper)
    fsdp = "fsdp"  # under torchrun: FSDP2, parameters/gradients/optimizer state sharded over the ranks


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class ModelConfig:
    name: ModelName = ModelName.transformer
    d_model: int = 512
    d_ff: int = 2048
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6  # transformer_lm: its number of blocks
    dropout: float = 0.1
    pre_norm: bool = True
    label_smoothing: float = 0.1
    max_positions: int = 1024


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sm3
    lr: float = 0.1
    momentum: float = 0.0  # sm3, sgd
    beta: float = 0.0  # sm3: 0 accumulates, > 0 is an exponential moving average
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # adam
    eps: Optional[float] = None  # None: the optimizer's own default
    weight_decay: float = 0.0
    fused: Optional[bool] = None  # sm3, adam: None picks the fused kernel where it is safe
    momentum_dtype: Optional[MomentumDtype] = None  # sm3: the momentum buffer's dtype; None: the parameter's


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.quadratic_warmup
    warmup_steps: Optional[int] = None  # None: warmup_fraction of trainer.max_steps
    warmup_fraction: float = 0.05
    cooldown: bool = False  # linear cool-down to 0 over the last cooldown_fraction of the run
    cooldown_fraction: float = 0.1


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.wandb
    mode: LoggerMode = LoggerMode.online  # online falls back to offline without credentials
    project: str = "sm3-translation"
    entity: Optional[str] = None


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_minutes: Optional[float] = None  # stop early (and evaluate) after this wall time
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on CUDA that has it and on CPUs with AMX or AVX-512 BF16, else fp32
    precision: Precision = Precision.auto
    # CPU: treat denormal floats as zero. They appear as a model grows confident (tiny probabilities and
    # gradients) and slow x86 arithmetic: the tiny model's steps measured ~20% slower without this.
    flush_denormal: bool = True
    grad_accum: int = 1
    compile: bool = False  # torch.compile the model's training forward (and backward); evaluation stays eager
    parallel: Parallel = Parallel.ddp  # fsdp: sharded training and checkpoints (needs torchrun)
    clip_norm: Optional[float] = None
    log_interval: int = 10
    eval_interval: int = 200
    eval_test: bool = False  # also evaluate the test split every eval_interval (score-against-steps curves)
    checkpoint_interval: int = 200
    checkpoint_minutes: Optional[float] = None  # also checkpoint after this much wall time since the last save
    keep_checkpoints: int = 3  # step-NNNNNN.pt files kept (newest); checkpoints/last.pt links the newest
    requeue_exit_code: Optional[int] = None  # exit status after SIGTERM/SIGINT + checkpoint; None: 128 + signal
    max_bad_steps: int = 10  # consecutive steps with NaN/inf loss or gradient (skipped) before giving up
    debug_nan_steps: list[int] = field(default_factory=list)  # testing aid: make these steps' loss NaN
    resume: Resume = Resume.auto  # auto: continue from checkpoints/last.pt when it exists
    polyak: bool = True  # evaluate an exponential moving average of the parameters too
    polyak_decay: float = 0.99  # EMA decay per step: a half-life of ~70 steps
    beam_size: int = 1
    length_penalty: float = 1.0
    eval_max_len: int = 256  # decoding stops at min(this, 1.5 * source length + 10)
    progress: bool = True  # a bar on a terminal; false, or not a terminal: a line every log_interval steps
    # Evaluate the run's newest checkpoint on eval_split instead of training: eval-<split>.json, nothing else written.
    eval_only: bool = False
    eval_split: EvalSplit = EvalSplit.both
    # A new run starts from this checkpoint's (or run directory's) model weights; a run with its own checkpoint resumes.
    init_from: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = MISSING
    data: Any = MISSING  # DataConfig (translation) or LMDataConfig (language modelling), set by the option
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = MISSING
    experiment: Any = None


# SM3's default lr by model width (conf/optim/sm3.yaml: ${sm3_lr:${model.d_model}}), measured on the built-in
# translation data: at d_model 128 lr 0.1 is best (docs/study/mt_tune.md); at 512 lr 0.1 never leaves the
# loss plateau while 0.01 reaches test BLEU 97 (docs/gpu_check.md). Between two measured widths the lr is
# log-log interpolated; outside them it is the nearest one's. An explicit optim.lr=... replaces the rule.
SM3_LR_BY_WIDTH = ((128, 0.1), (512, 0.01))


def sm3_lr(d_model: int) -> float:
    widths = SM3_LR_BY_WIDTH
    if d_model <= widths[0][0]:
        return widths[0][1]
    for (d0, lr0), (d1, lr1) in zip(widths, widths[1:]):
        if d_model <= d1:
            return float(f"{lr0 * (lr1 / lr0) ** (math.log(d_model / d0) / math.log(d1 / d0)):.3g}")
    return widths[-1][1]


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [("model", ModelConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig),
                        ("data", DataConfig), ("logger", LoggerConfig), ("trainer", TrainerConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    cs.store(group="data", name="lm_data_schema", node=LMDataConfig)
    # hydra.output_subdir in conf/config.yaml: an evaluate-only run keeps the run's .hydra/ (its overrides,
    # which scripts/compare.py labels it by) as training wrote it.
    OmegaConf.register_new_resolver("sm3_lr", sm3_lr, replace=True)
    OmegaConf.register_new_resolver("unless_eval_only", lambda eval_only, subdir: None if eval_only else subdir,
                                    replace=True)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


_COMPOSING = threading.Lock()  # Hydra's state is one per process: threads (the study's lanes) compose in turn


def compose(overrides=(), hydra_config: bool = False):
    """conf/config.yaml with ``overrides``, as train.py sees it (outside a Hydra app: scripts, tests);
    ``hydra_config`` adds the ``hydra`` node (launcher, sweeper)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register()
    with _COMPOSING, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


# --- checks at start, beyond types: unknown keys (also those added with `+`) and value ranges ---------

def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _in(low, high, closed=False):
    return ((lambda v: low <= v <= high) if closed else (lambda v: low <= v < high)), \
        f"in [{low}, {high}{']' if closed else ')'}"


def _positive():
    return (lambda v: v > 0), "> 0"


# key: (check, the valid range in words). A None value (where the schema allows it) is not checked.
RANGES = {
    "trainer.max_steps": _at_least(1), "trainer.grad_accum": _at_least(1), "trainer.log_interval": _at_least(1),
    "trainer.eval_interval": _at_least(1), "trainer.checkpoint_interval": _at_least(1),
    "trainer.keep_checkpoints": _at_least(1), "trainer.max_bad_steps": _at_least(1),
    "trainer.max_minutes": _positive(), "trainer.checkpoint_minutes": _at_least(0), "trainer.clip_norm": _positive(),
    "trainer.polyak_decay": _in(0, 1), "trainer.beam_size": _at_least(1), "trainer.eval_max_len": _at_least(1),
    "trainer.length_penalty": _at_least(0), "trainer.requeue_exit_code": _in(0, 255, closed=True),
    "optim.lr": _at_least(0), "optim.momentum": _in(0, 1), "optim.beta": _in(0, 1), "optim.eps": _at_least(0),
    "optim.weight_decay": _at_least(0), "optim.betas": ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
                                                          "two values in [0, 1)"),
    "schedule.warmup_steps": _at_least(0), "schedule.warmup_fraction": _in(0, 1, closed=True),
    "schedule.cooldown_fraction": _in(0, 1, closed=True),
    "model.d_model": _at_least(1), "model.d_ff": _at_least(1), "model.heads": _at_least(1),
    "model.encoder_layers": _at_least(0), "model.decoder_layers": _at_least(1), "model.dropout": _in(0, 1),
    "model.label_smoothing": _in(0, 1), "model.max_positions": _at_least(1),
    "data.vocab_size": _at_least(8), "data.max_tokens": _at_least(1), "data.max_len": _at_least(2),
    "data.seq_len": _at_least(1), "data.num_train": _at_least(1), "data.num_valid": _at_least(1),
    "data.num_test": _at_least(1), "data.max_valid": _at_least(1),
}


def _unknown_keys(cfg) -> list[str]:
    """Keys the schemas do not have: `+optim.lrr=0.1` is accepted by Hydra and would be ignored."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    problems = []
    for prefix, node in [("", cfg)] + [(f"{g}.", cfg[g]) for g in ("model", "optim", "schedule", "data", "logger",
                                                                   "trainer") if g in cfg]:
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema) or not isinstance(node, DictConfig):
            continue
        valid = [f.name for f in dataclasses.fields(schema)]
        problems += [f"unknown key {prefix}{key}; valid keys of {prefix.rstrip('.') or 'the config'}: "
                     f"{', '.join(valid)}" for key in node if key not in valid]
    return problems


def validate(cfg) -> None:
    """Raise ConfigError (one line: the key, the value, the valid range) for what the types let through."""
    from omegaconf import OmegaConf

    from trainer.errors import ConfigError

    problems = _unknown_keys(cfg)
    for key, (ok, valid) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            problems.append(f"{key}={value} is out of range (valid: {valid})")
    if cfg.model.d_model % cfg.model.heads:
        problems.append(f"model.d_model={cfg.model.d_model} must be divisible by model.heads={cfg.model.heads}")
    if problems:
        raise ConfigError("; ".join(problems))
