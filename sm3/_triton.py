"""The fused SM3 step on CUDA as Triton kernels, a constant number of launches per step.

A Transformer has ~250 parameter tensors, many tiny: one launch each cost more than the
arithmetic. So every launch steps many tensors (as ``multi_tensor_apply`` does): a table of
int64 addresses and sizes, one row per tensor, built on the host and copied to the device in one
tensor per step, and a table of (tensor, block) pairs, one per program. A program loads its
tensor's addresses and casts them to typed pointers. Launches: one per (rank, dtypes, alignment)
group (normally two, rank 2 and rank 0/1; one more per other rank present), plus the zeroed
maxima buffer and one multi-tensor copy.

Rank k >= 2: the tensor seen as an (n_0, n_1 * ... * n_{k-1}) matrix, in (BLOCK_R x BLOCK_C)
tiles. Each tile reads the accumulators of its rows (dimension 0) and of its columns' indices in
dimensions 1 .. k-1 (split from the column by div/mod with the shape), computes nu, updates the
parameter (and momentum) and folds the tile's row maxima, and its column maxima by their index in
each later dimension, into zeroed buffers with float atomic max (nu >= 0, so the maxima are exact
and order-independent); the buffers replace the accumulators after the launch. Rank 0/1:
elementwise.

Hyperparameters are runtime scalars and the kernels are specialised only on dtypes, alignment and
the momentum switch (and the rank), so a learning-rate schedule never triggers a recompilation.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from sm3._hyperparams import Hyperparams

_BLOCK_R, _BLOCK_C, _BLOCK = 16, 256, 2048
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Address-table rows, one per tensor. Rank k >= 2 (3 + 3k fields): x, g, m, acc_0 .. acc_{k-1},
# the offsets of their maxima in the step's maxima buffer, n_0 .. n_{k-1}. Rank 0/1 (5 fields):
# x, g, m, acc, n.
# ALIGNED kernels: every address a multiple of 16 bytes, and n_1 * ... * n_{k-1} (rank k >= 2) or
# n (rank 0/1) a multiple of 16 elements, so that rows and masks split into whole vectors.
_INDEX_CACHE: OrderedDict = OrderedDict()  # (device, blocks per tensor) -> device index table
_INDEX_CACHE_SIZE = 32


@triton.jit
def _pointer(row, field, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    # Addresses from a table carry no alignment facts; the host checked them when ALIGNED, and
    # the hint lets the compiler vectorise the loads and stores as it did for tensor arguments.
    ptr = tl.load(row + field).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _tail(x_ptr, m_ptr, offs, mask, g, nu, x, m, neg_lr, momentum, eps, decay,
          HAS_M: tl.constexpr):
    u = g / tl.sqrt(nu + eps)
    if HAS_M:
        u = momentum * m + (1.0 - momentum) * u
        tl.store(m_ptr + offs, u.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + offs, (x * decay + neg_lr * u).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _factored_kernel(table, index, maxima, neg_lr, momentum, acc_coef, sq_coef, eps, decay, sign,
                     X_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, HAS_M: tl.constexpr,
                     ALIGNED: tl.constexpr, RANK: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # The tensor as a (n_0, n_1 * ... * n_{RANK-1}) matrix: rows are dimension 0, and a column
    # splits by div/mod into the indices of dimensions 1 .. RANK-1 (for RANK 2, the column).
    pid = tl.program_id(0)
    row = table + tl.load(index + 2 * pid).to(tl.int64) * (3 + 3 * RANK)
    tile = tl.load(index + 2 * pid + 1)
    x_ptr = _pointer(row, 0, X_DTYPE, ALIGNED)
    g_ptr = _pointer(row, 1, X_DTYPE, ALIGNED)
    m_ptr = _pointer(row, 2, M_DTYPE, ALIGNED)
    sizes = row + 3 + 2 * RANK
    n_rows = tl.load(sizes).to(tl.int32)
    n_cols = tl.load(sizes + 1).to(tl.int32)
    for d in tl.static_range(2, RANK):
        n_cols *= tl.load(sizes + d).to(tl.int32)
    if ALIGNED:
        n_cols = tl.multiple_of(n_cols, 16)
    col_tiles = tl.cdiv(n_cols, BLOCK_C)
    rows = (tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_in, col_in = rows < n_rows, cols < n_cols
    mask = row_in[:, None] & col_in[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    a_row = tl.load(_pointer(row, 3, tl.float32, ALIGNED) + rows, mask=row_in, other=0.0)
    a_col = tl.full([BLOCK_C], float("inf"), tl.float32)  # min over dimensions 1 .. RANK-1
    rest = cols
    for k in tl.static_range(1, RANK):  # the last dimension varies fastest
        d = RANK - k
        n_d = tl.load(sizes + d).to(tl.int32)
        a_d = _pointer(row, 3 + d, tl.float32, ALIGNED)
        a_col = tl.minimum(a_col, tl.load(a_d + rest % n_d, mask=col_in, other=0.0))
        rest = rest // n_d
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = 0.0
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nu = acc_coef * tl.minimum(a_row[:, None], a_col[None, :]) + sq_coef * g * g
    nu = tl.where(mask, nu, 0.0)
    # Dimension 0's maxima are the rows'; dimension d's gather the columns' maxima by index.
    tl.atomic_max(maxima + tl.load(row + 3 + RANK) + rows, tl.max(nu, axis=1), mask=row_in)
    col_max = tl.max(nu, axis=0)
    rest = cols
    for k in tl.static_range(1, RANK):
        d = RANK - k
        n_d = tl.load(sizes + d).to(tl.int32)
        tl.atomic_max(maxima + tl.load(row + 3 + RANK + d) + rest % n_d, col_max, mask=col_in)
        rest = rest // n_d
    _tail(x_ptr, m_ptr, offs, mask, g, nu, x, m, neg_lr, momentum, eps, decay, HAS_M)


@triton.jit
def _diagonal_kernel(table, index, neg_lr, momentum, acc_coef, sq_coef, eps, decay, sign,
                     X_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, HAS_M: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(index + 2 * pid).to(tl.int64) * 5
    block = tl.load(index + 2 * pid + 1)
    x_ptr = _pointer(row, 0, X_DTYPE, ALIGNED)
    g_ptr = _pointer(row, 1, X_DTYPE, ALIGNED)
    m_ptr = _pointer(row, 2, M_DTYPE, ALIGNED)
    acc_ptr = _pointer(row, 3, tl.float32, ALIGNED)
    n = tl.load(row + 4)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = 0.0
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nu = acc_coef * tl.load(acc_ptr + offs, mask=mask, other=0.0) + sq_coef * g * g
    tl.store(acc_ptr + offs, nu, mask=mask)
    _tail(x_ptr, m_ptr, offs, mask, g, nu, x, m, neg_lr, momentum, eps, decay, HAS_M)


def _block_index(counts: tuple[int, ...], device: torch.device) -> Tensor:
    """(tensor, block within the tensor) int32 pairs, one per program. Depends only on the
    block counts, so it is cached on the device under them (never stale: no addresses)."""
    key = (device, counts)
    index = _INDEX_CACHE.get(key)
    if index is None:
        sizes = torch.tensor(counts, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(counts)), sizes)
        local = torch.arange(owner.numel()) - (torch.cumsum(sizes, 0) - sizes)[owner]
        index = torch.stack([owner, local], 1).to(torch.int32).reshape(-1).to(device)
        _INDEX_CACHE[key] = index
        if len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    else:
        _INDEX_CACHE.move_to_end(key)
    return index


def fused_step(params: list[Tensor], grads: list[Tensor], accumulators: list[Tensor],
               momentum_buffers: list[Tensor], hyper: Hyperparams) -> None:
    """Same contract as the ``sm3::fused_step_`` op (``hyper.lr`` a float)."""
    lr, beta = hyper.lr, hyper.beta
    scalars = dict(
        neg_lr=-lr, momentum=hyper.momentum,
        acc_coef=beta if beta > 0 else 1.0, sq_coef=1.0 - beta if beta > 0 else 1.0,
        eps=hyper.eps, decay=1.0 - lr * hyper.weight_decay, sign=-1.0 if hyper.maximize else 1.0,
    )
    has_m = bool(momentum_buffers)
    device = params[0].device
    # group key (rank, 0 for 0/1; x dtype, m dtype, aligned) -> (address-table rows, blocks per
    # tensor)
    groups: dict = {}
    targets, sizes = [], []  # rank >= 2 accumulators and their lengths, in maxima order
    next_acc = next_max = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        m = momentum_buffers[i] if has_m else p  # a placeholder address when there is none
        rank, n = p.dim(), p.numel()
        if rank <= 1:
            acc = accumulators[next_acc]
            next_acc += 1
            if not n:
                continue
            x_a, g_a, m_a, acc_a = p.data_ptr(), g.data_ptr(), m.data_ptr(), acc.data_ptr()
            aligned = not (x_a | g_a | m_a | acc_a | n) % 16
            rows, counts = groups.setdefault((0, p.dtype, m.dtype, aligned), ([], []))
            rows += (x_a, g_a, m_a, acc_a, n)
            counts.append(-(-n // _BLOCK))
            continue
        accs = accumulators[next_acc:next_acc + rank]
        next_acc += rank
        if not n:
            continue
        x_a, g_a, m_a = p.data_ptr(), g.data_ptr(), m.data_ptr()
        acc_a = [a.data_ptr() for a in accs]
        n_cols = n // p.shape[0]
        aligned = not any(v % 16 for v in (x_a, g_a, m_a, *acc_a, n_cols))
        rows, counts = groups.setdefault((rank, p.dtype, m.dtype, aligned), ([], []))
        # each dimension's maxima: offsets into the step's maxima buffer
        offsets = itertools.accumulate(p.shape[:-1], initial=next_max)
        rows += (x_a, g_a, m_a, *acc_a, *offsets, *p.shape)
        counts.append(-(-p.shape[0] // _BLOCK_R) * -(-n_cols // _BLOCK_C))
        targets += accs
        sizes += p.shape
        next_max += sum(p.shape)
    if not groups:
        return
    # One zeroed buffer holds the new maxima of every rank >= 2 parameter: one allocation and one
    # multi-tensor copy per step instead of three launches per parameter.
    maxima = torch.zeros(next_max, dtype=torch.float32, device=device) if next_max else None
    # Every group's address rows in one tensor: one host-to-device copy per step. Rebuilt each
    # step, since the gradients (and, after a reload, the state) may be new tensors.
    flat, starts = [], []
    for rows, _ in groups.values():
        flat += [0] * (len(flat) % 2)  # each group's rows start 16-byte aligned
        starts.append(len(flat))
        flat += rows
    table = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        # From pinned memory the copy is asynchronous (a pageable one waits for the stream), and
        # torch's pinned allocator keeps the block until the copy has run.
        table = table.pin_memory().to(device, non_blocking=True)
    for (rank, x_dtype, m_dtype, aligned), (_, counts), start in zip(
            groups, groups.values(), starts):
        index = _block_index(tuple(counts), device)
        if device.type == "cuda":  # cached: may be evicted while a launch on this stream reads it
            index.record_stream(torch.cuda.current_stream(device))
        grid = (index.numel() // 2,)
        kinds = dict(X_DTYPE=_TL[x_dtype], M_DTYPE=_TL[m_dtype], HAS_M=has_m, ALIGNED=aligned)
        if rank:
            _factored_kernel[grid](table[start:], index, maxima, **scalars, **kinds, RANK=rank,
                                   BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
        else:
            _diagonal_kernel[grid](table[start:], index, **scalars, **kinds, BLOCK=_BLOCK)
    if targets:
        torch._foreach_copy_(targets, maxima.split(sizes))
