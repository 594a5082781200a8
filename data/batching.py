"""Length-bucketed batches under a token budget, shuffled per epoch without global RNG."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One batch; all tensors right-padded with pad_id.

    src:     [B, S] source ids + eos
    tgt_in:  [B, T] bos + target ids   (decoder input, teacher forcing)
    tgt_out: [B, T] target ids + eos   (labels)
    indices: positions of the examples in the split's sources/targets
    num_tokens: non-pad tokens in tgt_out (the loss normaliser)
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    indices: list[int]
    num_tokens: int

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.src.to(device, non_blocking=non_blocking),
                     self.tgt_in.to(device, non_blocking=non_blocking),
                     self.tgt_out.to(device, non_blocking=non_blocking),
                     self.indices, self.num_tokens)


def example_cost(source_ids: Sequence[int], target_ids: Sequence[int]) -> int:
    """Padded width an example needs: max(len(src)+eos, len(tgt)+bos/eos)."""
    return max(len(source_ids), len(target_ids)) + 1


def bucket_indices(costs: Sequence[int], max_tokens: int, rng: random.Random | None
                   ) -> list[list[int]]:
    """Cut examples, sorted by cost, into batches with len(batch) * max cost <= max_tokens.

    With `rng`, equal-cost examples are ordered randomly (so batches differ between
    epochs) and the batch order is shuffled; without it everything is in index order.
    """
    order = list(range(len(costs)))
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: costs[i])  # stable: random order within equal cost
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so costs[i] is the new maximum of the current batch.
        if current and (len(current) + 1) * costs[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def shard(batches: list, rank: int, world_size: int) -> list:
    """Every world_size-th batch from `rank`, dropping the tail so all ranks get as many."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    usable = len(batches) - len(batches) % world_size
    if usable < len(batches):
        logger.debug("dropping %d of %d batches so %d ranks get equal counts",
                     len(batches) - usable, len(batches), world_size)
    return batches[rank:usable:world_size]


def collate(indices: list[int], source_ids: Sequence[Sequence[int]],
            target_ids: Sequence[Sequence[int]], pad_id: int, bos_id: int, eos_id: int) -> Batch:
    sources = [source_ids[i] for i in indices]
    targets = [target_ids[i] for i in indices]
    src_width = max(len(s) for s in sources) + 1
    tgt_width = max(len(t) for t in targets) + 1
    # One torch.tensor call per field: far cheaper than filling rows one by one.
    src = torch.tensor([[*s, eos_id] + [pad_id] * (src_width - len(s) - 1) for s in sources],
                       dtype=torch.long)
    tgt_in = torch.tensor([[bos_id, *t] + [pad_id] * (tgt_width - len(t) - 1) for t in targets],
                          dtype=torch.long)
    tgt_out = torch.tensor([[*t, eos_id] + [pad_id] * (tgt_width - len(t) - 1) for t in targets],
                           dtype=torch.long)
    num_tokens = sum(len(t) + 1 for t in targets)
    return Batch(src, tgt_in, tgt_out, list(indices), num_tokens)
