"""Optimizer-state bytes per rank under FSDP2, and the communication SM3 adds per step.

Computed from the sharding rule, not measured with N processes: FSDP2 shards every
parameter on dimension 0 in ``torch.chunk`` pieces (rank 0 holds the most rows). Adam keeps
two full-size float32 buffers per shard. SM3 (``sm3._sharding``) shards the dimension-0
accumulator with the parameter and replicates the others; each replicated accumulator is
combined by one MAX all-reduce per step. ``tests/test_sharded_sm3.py`` checks these
numbers against a real 2-process run.

    uv run scripts/sharded_state.py --model big --world-sizes 2 4 8
"""

from __future__ import annotations

import argparse
import math

from scripts._shapes import MODELS, model_shapes

FLOAT32 = 4


def rows_on_rank(n: int, world_size: int, rank: int = 0) -> int:
    """Rows of a dimension of size ``n`` that ``rank`` holds under ``torch.chunk`` sharding."""
    per_rank = math.ceil(n / world_size)
    return max(0, min(per_rank, n - rank * per_rank))


def state_bytes_per_rank(shapes, world_size: int, optimizer: str, rank: int = 0) -> int:
    """Optimizer-state bytes on ``rank`` (float32 state, step counters left out)."""
    total = 0
    for shape in shapes:
        local_rows = rows_on_rank(shape[0], world_size, rank) if shape else 1
        local_numel = local_rows * math.prod(shape[1:])
        if optimizer == "adam":
            total += 2 * local_numel
            continue
        if len(shape) <= 1:
            total += local_numel  # elementwise accumulator, sharded like the parameter
        else:
            total += local_rows + sum(shape[1:])  # sharded row accumulator, replicated others
        if optimizer == "sm3_momentum":
            total += local_numel
    return total * FLOAT32


def sm3_allreduce_bytes(shapes) -> int:
    """Bytes SM3 all-reduces (MAX) per step: every replicated accumulator, once."""
    return FLOAT32 * sum(sum(shape[1:]) for shape in shapes if len(shape) >= 2)


def ring_traffic(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``."""
    return 2 * (world_size - 1) / world_size * nbytes


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="big")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    shapes = [shape for _, shape in model_shapes(spec)]
    params = sum(math.prod(s) for s in shapes)
    mib = 2**20
    lines = [
        f"{spec.name}: {params / 1e6:.1f}M parameters, FSDP2 (Shard(0)), float32 state, rank 0 (the fullest)",
        "",
        "| world size | Adam MiB/rank | SM3 MiB/rank | SM3 % of Adam | SM3+momentum MiB/rank | "
        "SM3 all-reduce KiB/step | its ring traffic KiB/rank | FSDP grad reduce-scatter MiB/rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    allreduce = sm3_allreduce_bytes(shapes)
    for world in args.world_sizes:
        adam = state_bytes_per_rank(shapes, world, "adam")
        sm3 = state_bytes_per_rank(shapes, world, "sm3")
        sm3m = state_bytes_per_rank(shapes, world, "sm3_momentum")
        # FSDP itself reduce-scatters float32 gradients: (W-1)/W of them leave each rank.
        reduce_scatter = (world - 1) / world * params * FLOAT32
        lines.append(
            f"| {world} | {adam / mib:.1f} | {sm3 / mib:.2f} | {100 * sm3 / adam:.2f}% | {sm3m / mib:.1f} | "
            f"{allreduce / 1024:.0f} | {ring_traffic(allreduce, world) / 1024:.0f} | {reduce_scatter / mib:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
