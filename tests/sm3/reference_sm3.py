"""A plain, readable SM3-II written from the paper's pseudocode and the TensorFlow original.

It favours clarity over speed: the full ``nu`` tensor is materialised, every accumulator
is recomputed from it, and sparse rows are handled one by one. Computation is in float64,
so comparing the fast paths with it checks them to float32 rounding.
"""

from __future__ import annotations

import torch


class ReferenceSM3:
    def __init__(self, lr=0.1, momentum=0.0, beta=0.0, eps=1e-30, weight_decay=0.0, maximize=False):
        self.lr, self.momentum, self.beta, self.eps = lr, momentum, beta, eps
        self.weight_decay, self.maximize = weight_decay, maximize
        self.state: dict[int, dict] = {}

    def accumulators(self, key: int) -> list[torch.Tensor]:
        return self.state[key]["accumulators"]

    def _init(self, key: int, p: torch.Tensor) -> dict:
        if key not in self.state:
            # Rank 0 and 1: one accumulator entry per parameter entry (diagonal Adagrad).
            # Rank k >= 2: one vector per dimension; the cover sets are the slices p[.., j, ..].
            shapes = [p.shape] if p.dim() <= 1 else [(n,) for n in p.shape]
            self.state[key] = {
                "accumulators": [torch.zeros(s, dtype=torch.float64) for s in shapes],
                "momentum": torch.zeros(p.shape, dtype=torch.float64),
            }
        return self.state[key]

    def step(self, key: int, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """One dense step; returns the new parameter (float64)."""
        state = self._init(key, p)
        p, g = p.double(), g.double()
        if self.maximize:
            g = -g
        accs = state["accumulators"]
        if p.dim() <= 1:
            previous = accs[0]
        else:
            # min over the cover sets containing each entry: min_r a_r[i_r]
            broadcast = [
                a.reshape([-1 if r == i else 1 for r in range(p.dim())]).expand(p.shape)
                for i, a in enumerate(accs)
            ]
            previous = torch.stack(broadcast).amin(dim=0)
        nu = self.beta * previous + (1 - self.beta) * g * g if self.beta else previous + g * g
        if p.dim() <= 1:
            accs[0] = nu
        else:
            for i in range(p.dim()):
                others = [d for d in range(p.dim()) if d != i]
                accs[i] = nu.amax(dim=others)
        update = g / torch.sqrt(nu + self.eps)
        if self.momentum > 0:
            state["momentum"] = self.momentum * state["momentum"] + (1 - self.momentum) * update
            update = state["momentum"]
        return p - self.lr * self.weight_decay * p - self.lr * update

    def sparse_step(self, key: int, p: torch.Tensor, indices, values) -> torch.Tensor:
        """The original's sparse path: rows ``indices`` (may repeat) with gradient ``values``."""
        state = self._init(key, p)
        p = p.double().clone()
        acc = state["accumulators"][0]
        rows: dict[int, torch.Tensor] = {}
        for i, v in zip(indices, values):  # duplicate indices are summed
            rows[int(i)] = rows.get(int(i), 0) + v.double()
        for i, g in rows.items():
            if self.maximize:
                g = -g
            nu = self.beta * acc[i] + (1 - self.beta) * g * g if self.beta else acc[i] + g * g
            acc[i] = nu.max()
            p[i] = p[i] - self.lr * self.weight_decay * p[i] - self.lr * g / torch.sqrt(nu + self.eps)
        return p
