"""`build_optimizer(cfg.optim, params)`: the one place optimizers are made from config."""

from __future__ import annotations

import torch

from sm3 import SM3

OPTIMIZERS = ("sm3", "adam", "adagrad", "adafactor", "sgd")


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.name == "sm3":
        momentum_dtype = getattr(torch, cfg.momentum_dtype.value) if cfg.momentum_dtype else None
        return SM3(params, lr=cfg.lr, momentum=cfg.momentum, beta=cfg.beta, weight_decay=cfg.weight_decay,
                   fused=cfg.fused, momentum_dtype=momentum_dtype, **eps)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                fused=cfg.fused, **eps)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **eps)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"Unknown optim.name={cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
