"""The fused SM3 step on CUDA as Triton kernels, one launch per parameter.

Rank 2: a 2-D grid of (BLOCK_R x BLOCK_C) tiles. Each tile reads its rows' and columns'
accumulators, computes nu, updates the parameter (and momentum) and folds the tile's row and
column maxima into zeroed buffers with float atomic max (nu >= 0, so the maxima are exact and
order-independent); the buffers replace the accumulators after the launch. Rank 0/1:
elementwise. Rank >= 3 takes the default path on CUDA (see ``sm3._fused.supports``).

Hyperparameters are runtime scalars and the kernels are specialised only on dtypes and the
momentum/beta switches, so a learning-rate schedule never triggers a recompilation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_R, _BLOCK_C, _BLOCK = 16, 256, 2048


@triton.jit
def _tail(x_ptr, m_ptr, offs, mask, g, nu, x, m, neg_lr, momentum, eps, decay,
          HAS_M: tl.constexpr):
    u = g / tl.sqrt(nu + eps)
    if HAS_M:
        u = momentum * m + (1.0 - momentum) * u
        tl.store(m_ptr + offs, u.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + offs, (x * decay + neg_lr * u).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _factored_kernel(x_ptr, g_ptr, m_ptr, row_acc, col_acc, row_max, col_max, n_rows, n_cols,
                     neg_lr, momentum, acc_coef, sq_coef, eps, decay, sign,
                     HAS_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_in, col_in = rows < n_rows, cols < n_cols
    mask = row_in[:, None] & col_in[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    a_row = tl.load(row_acc + rows, mask=row_in, other=0.0)
    a_col = tl.load(col_acc + cols, mask=col_in, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = 0.0
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nu = acc_coef * tl.minimum(a_row[:, None], a_col[None, :]) + sq_coef * g * g
    nu = tl.where(mask, nu, 0.0)
    tl.atomic_max(row_max + rows, tl.max(nu, axis=1), mask=row_in)
    tl.atomic_max(col_max + cols, tl.max(nu, axis=0), mask=col_in)
    _tail(x_ptr, m_ptr, offs, mask, g, nu, x, m, neg_lr, momentum, eps, decay, HAS_M)


@triton.jit
def _diagonal_kernel(x_ptr, g_ptr, m_ptr, acc_ptr, n, neg_lr, momentum, acc_coef, sq_coef, eps,
                     decay, sign, HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = 0.0
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nu = acc_coef * tl.load(acc_ptr + offs, mask=mask, other=0.0) + sq_coef * g * g
    tl.store(acc_ptr + offs, nu, mask=mask)
    _tail(x_ptr, m_ptr, offs, mask, g, nu, x, m, neg_lr, momentum, eps, decay, HAS_M)


def fused_step(params: list[Tensor], grads: list[Tensor], accumulators: list[Tensor],
               momentum_buffers: list[Tensor], lr: float, momentum: float, beta: float,
               eps: float, weight_decay: float, maximize: bool) -> None:
    """Same contract as the ``sm3::fused_step_`` op; parameters of rank <= 2 only."""
    scalars = dict(
        neg_lr=-lr, momentum=momentum,
        acc_coef=beta if beta > 0 else 1.0, sq_coef=1.0 - beta if beta > 0 else 1.0,
        eps=eps, decay=1.0 - lr * weight_decay, sign=-1.0 if maximize else 1.0,
    )
    has_m = bool(momentum_buffers)
    # One zeroed buffer holds the new maxima of every rank-2 parameter: one allocation and one
    # multi-tensor copy per step instead of three launches per parameter.
    factored = [p for p in params if p.dim() == 2]
    maxima = torch.zeros(sum(sum(p.shape) for p in factored), dtype=torch.float32,
                         device=params[0].device) if factored else None
    targets, sources = [], []
    next_acc = next_max = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        m = momentum_buffers[i] if has_m else p  # a placeholder pointer when there is none
        if p.dim() <= 1:
            acc = accumulators[next_acc]
            next_acc += 1
            n = p.numel()
            if n:
                _diagonal_kernel[(triton.cdiv(n, _BLOCK),)](
                    p, g, m, acc, n, **scalars, HAS_M=has_m, BLOCK=_BLOCK
                )
            continue
        if p.dim() != 2:
            raise ValueError(f"sm3 triton: rank {p.dim()} is not supported (rank <= 2 only)")
        row_acc, col_acc = accumulators[next_acc], accumulators[next_acc + 1]
        next_acc += 2
        n_rows, n_cols = p.shape
        row_max = maxima[next_max:next_max + n_rows]
        col_max = maxima[next_max + n_rows:next_max + n_rows + n_cols]
        next_max += n_rows + n_cols
        if p.numel() == 0:
            continue
        grid = (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(n_cols, _BLOCK_C))
        _factored_kernel[grid](
            p, g, m, row_acc, col_acc, row_max, col_max, n_rows, n_cols,
            **scalars, HAS_M=has_m, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
        )
        targets += [row_acc, col_acc]
        sources += [row_max, col_max]
    if targets:
        torch._foreach_copy_(targets, sources)
