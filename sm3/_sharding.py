"""SM3 on sharded (DTensor) parameters, as made by FSDP2's ``fully_shard`` or tensor parallelism.

The accumulator of a sharded dimension is sharded with the parameter; every other
accumulator is replicated. A step works on the local shards; the only communication is a
MAX all-reduce of each replicated accumulator over the shard group (its maximum runs over
the sharded dimension), so a step moves O(n_1 + ... + n_k) numbers per parameter and never
gathers the parameter. Results equal single-device SM3 to float rounding.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


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
    placements = [Shard(0) if pl.is_shard() and pl.dim == dim else Replicate() for pl in p.placements]
    local = torch.zeros(p.to_local().shape[dim], dtype=dtype, device=p.to_local().device)
    return DTensor.from_local(local, p.device_mesh, placements, shape=(p.shape[dim],), stride=(1,))


def local(t):
    return t.to_local() if is_dtensor(t) else t


def max_reducer(p: "DTensor") -> Optional[Callable[[int, Tensor], None]]:
    """``reduce(dim, acc)``: all-reduce the local maxima ``acc`` of dimension ``dim`` in place."""
    shards = _shards(p)
    if not shards:
        return None

    def reduce(dim: int, acc: Tensor) -> None:
        for sharded_dim, group in shards:
            if sharded_dim != dim:  # this maximum runs over a sharded dimension
                dist.all_reduce(acc, op=dist.ReduceOp.MAX, group=group)

    return reduce
