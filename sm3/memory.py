"""Memory accounting for optimizer state."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):  # DTensor: count this process's shard
            value = value.to_local()
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (any torch optimizer), steps included.

    For sharded (DTensor) state, the bytes held by this process.

    Call it after the first ``step()``: most optimizers allocate their state lazily.
    """
    return sum(_tensor_bytes(state) for state in optimizer.state.values())
