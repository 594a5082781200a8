"""The hyperparameters of one SM3 step: one record from the optimizer down to the kernels."""

from __future__ import annotations

from typing import NamedTuple, Union

from torch import Tensor


class Hyperparams(NamedTuple):
    """A parameter group's hyperparameters (their meaning: ``sm3.SM3``). ``lr`` may be a tensor."""

    lr: Union[float, Tensor]
    momentum: float
    beta: float
    eps: float
    weight_decay: float
    maximize: bool

    @classmethod
    def of(cls, group: dict) -> Hyperparams:
        return cls(group["lr"], group["momentum"], group["beta"], group["eps"], group["weight_decay"],
                   group["maximize"])
