"""Typed schemas of every config group, registered in Hydra's ConfigStore (`register()`).

YAML files in `conf/` only fill values: a misspelt key or a wrong type fails at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

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
    precision: Precision = Precision.auto  # auto: bf16 autocast on CUDA that supports it, else fp32
    # CPU: treat denormal floats as zero. They appear as a model grows confident (tiny probabilities and
    # gradients) and slow x86 arithmetic: the tiny model's steps measured ~20% slower without this.
    flush_denormal: bool = True
    grad_accum: int = 1
    parallel: Parallel = Parallel.ddp  # fsdp: sharded training and checkpoints (needs torchrun)
    clip_norm: Optional[float] = None
    log_interval: int = 10
    eval_interval: int = 200
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
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = MISSING
    data: Any = MISSING  # DataConfig (translation) or LMDataConfig (language modelling), set by the option
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = MISSING
    experiment: Any = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [("model", ModelConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig),
                        ("data", DataConfig), ("logger", LoggerConfig), ("trainer", TrainerConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    cs.store(group="data", name="lm_data_schema", node=LMDataConfig)
