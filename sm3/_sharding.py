"""SM3 on sharded (DTensor) parameters, as made by FSDP2's ``fully_shard`` or tensor parallelism.

The accumulator of a sharded dimension is sharded with the parameter; every other
accumulator is replicated. A step works on the local shards; the only communication is a
MAX all-reduce of the replicated accumulators over the shard group (their maxima run over
the sharded dimension), all parameters' in one flat buffer per process group, so a step
moves O(n_1 + ... + n_k) numbers per parameter and never gathers the parameter. Results
equal single-device SM3 to float rounding.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_dtensor(t: Tensor) -> bool:
    # torch.distributed.tensor is imported only where DTensors exist (it measured 2-3 s of every
    # process's start): until something has imported it, no tensor can be one.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _shards(p: "DTensor") -> list[tuple[int, "dist.ProcessGroup"]]:
    """(tensor dim, process group) for each mesh dimension that shards ``p``."""
    shards = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_shard():
            shards.append((placement.dim, p.device_mesh.get_group(mesh_dim)))
        elif not placement.is_replicate():
            raise ValueError(f"SM3 supports Shard and Replicate placements, got {placement}")
    return shards


def dim_accumulator(p: "DTensor", dim: int, dtype: torch.dtype) -> "DTensor":
    """A zero accumulator for dimension ``dim`` of ``p``, sharded where that dimension is."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(0) if pl.is_shard() and pl.dim == dim else Replicate() for pl in p.placements]
    local = torch.zeros(p.to_local().shape[dim], dtype=dtype, device=p.to_local().device)
    return DTensor.from_local(local, p.device_mesh, placements, shape=(p.shape[dim],), stride=(1,))


def local(t):
    return t.to_local() if is_dtensor(t) else t


def add_max(pending: dict, p: "DTensor", accumulators: list[Tensor]) -> None:
    """Adds to ``pending`` the local accumulators of ``p`` whose maxima run over a sharded
    dimension (every accumulator but the sharded dimension's own), keyed by process group."""
    if p.dim() <= 1:  # one elementwise accumulator, sharded like p
        return
    for sharded_dim, group in _shards(p):
        for dim, acc in enumerate(accumulators):
            if dim != sharded_dim:
                pending.setdefault((group, acc.dtype, acc.device), []).append(acc)


def all_reduce_max(pending: dict) -> None:
    """Replaces every accumulator in ``pending`` by its maximum over the shards: one MAX
    all-reduce of one flat buffer per process group (and dtype), then empties ``pending``."""
    for (group, _, _), accs in pending.items():
        flat = torch.cat([a.reshape(-1) for a in accs])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
        torch._foreach_copy_(accs, flat.split([a.numel() for a in accs]))
    pending.clear()
