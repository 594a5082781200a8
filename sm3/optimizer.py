"""SM3-II (Anil, Gupta, Koren, Singer, 2019) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from sm3 import _fused
from sm3._hyperparams import Hyperparams
from sm3._sharding import add_max, all_reduce_max, dim_accumulator, is_dtensor, local

__all__ = ["SM3"]

# Rows of a large parameter are processed in chunks of about this many elements per CPU
# thread, so that each thread's share of the workspace, the gradient and the parameter stays
# in its core's L2 cache while we make several passes (measured on a 2-core Xeon with 2 MiB L2
# per core: 2^17 per thread beat 2^16 by 25% and 2^18 by 3%).
_CHUNK_ELEMENTS = 1 << 17


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # 1e-30 and squared gradients underflow in half precision: keep statistics in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class SM3(Optimizer):
    r"""SM3-II: Adagrad-like adaptive steps with one accumulator per tensor dimension.

    For a parameter of shape ``(n_1, ..., n_k)``, ``k >= 2``, the second-moment state is the
    ``k`` vectors ``a_1 .. a_k`` (``n_1 + ... + n_k`` numbers). Each step, with
    ``g`` the gradient (negated when ``maximize``)::

        nu[i_1..i_k] = beta * min_r a_r[i_r] + (1 - beta) * g[i_1..i_k]**2   # beta = 0: plain sum
        a_r[j]       = max { nu[i_1..i_k] : i_r = j }                        # overwritten
        u            = g / sqrt(nu + eps)
        m            = momentum * m + (1 - momentum) * u                     # only if momentum > 0
        p            = p - lr * weight_decay * p - lr * (m if momentum > 0 else u)

    (with ``beta = 0`` the first line reads ``min_r a_r[i_r] + g**2``). Parameters of rank 0
    and 1 keep one full-size accumulator: ``acc = beta * acc + (1 - beta) * g**2`` (plain
    ``acc += g**2`` when ``beta = 0``), i.e. diagonal Adagrad, and ``nu = acc``.

    These are the semantics of the original TensorFlow SM3-II (google-research ``sm3``);
    ``beta > 0`` is the exponential moving average its README describes.

    Sparse gradients (``nn.Embedding(sparse=True)``) follow the original's sparse path:
    duplicate indices are summed, only the first-dimension accumulator is read and written,
    and only for the rows present, so absent rows keep their accumulator and their values.
    Momentum is **not** applied to sparse updates, and decoupled weight decay touches only
    the rows present.

    State per parameter (``optimizer.state[p]``): ``step`` (float32 scalar tensor);
    ``accumulator`` (same shape as ``p``) for rank <= 1, else ``accumulator_0`` ..
    ``accumulator_{k-1}`` (1-D, length ``n_r``); ``momentum_buffer`` (shape of ``p``) only
    when ``momentum > 0`` and a dense gradient has been seen. Statistics of float16/bfloat16
    parameters are kept in float32; all arithmetic of a step is done in the statistics dtype.

    Args:
        params: parameters or parameter groups (every hyperparameter may differ per group).
        lr: learning rate (default 0.1).
        momentum: heavy-ball coefficient in [0, 1); 0 allocates no buffer (default 0).
        beta: 0 accumulates squared gradients (the paper's best setting); in (0, 1) an
            exponential moving average (default 0).
        eps: added to ``nu`` before the square root (default 1e-30).
        weight_decay: decoupled weight decay, as AdamW: ``p -= lr * weight_decay * p``.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for compatibility with ``torch.optim`` and ignored. The default
            path steps matrices and higher-rank tensors one by one, in place, on cache-sized
            row chunks with one reused workspace: on CPU this measured about 2x faster than
            grouping parameters by shape into ``torch._foreach_*`` calls, and it never
            materialises temporaries for all parameters at once. With ``beta = 0`` on CPU each
            chunk's ``nu += g^2`` and update run in one pass through torch's built-in fused
            Adagrad kernel (``torch._fused_adagrad_``). Rank 0/1 parameters (biases, norms)
            are stepped together through ``torch._foreach_*`` ops, a chunk at a time.
        fused: ``True`` steps each parameter in one pass over memory: a C++/OpenMP kernel on
            CPU (compiled on first use, then cached) and a Triton kernel on CUDA. ``None``
            (default) does so wherever it can; ``False`` forces the default path. Parameters
            the kernel cannot take (sparse gradients, dtypes other than float32, bfloat16 and
            float16, non-contiguous tensors, CUDA without Triton, CPU without a compiler, which
            warns once) take the default path. Both paths agree to float32 rounding. The kernel
            also steps sharded (DTensor) parameters and traces under
            ``torch.compile(fullgraph=True)``; a CUDA step cannot be captured in a CUDA graph.
        momentum_dtype: dtype of ``momentum_buffer`` (default: the parameter's dtype);
            ``torch.bfloat16`` halves its memory. Arithmetic stays in the statistics dtype.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 0.1,
        momentum: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-30,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        momentum_dtype: Optional[torch.dtype] = None,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")  # torch.optim's wording
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if momentum_dtype is not None and not (
            isinstance(momentum_dtype, torch.dtype) and momentum_dtype.is_floating_point
        ):
            raise ValueError(f"Invalid momentum_dtype: {momentum_dtype} (must be a floating-point torch.dtype)")
        defaults = dict(
            lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay,
            maximize=maximize, foreach=foreach, fused=fused, momentum_dtype=momentum_dtype,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    "SM3 does not support complex parameters: view them as real "
                    "with torch.view_as_real and optimize that instead"
                )

    # torch's optimizers call this ``_init_group``; torch.compile runs a method of that name
    # eagerly while tracing and breaks the graph when the gradients are produced in the same
    # graph, so ``fullgraph=True`` would fail on a train step that does backward and step.
    def _gather_group(self, group: dict, params: list, grads: list, accumulators: list,
                      momentum_buffers: list, state_steps: list, fusable: list) -> None:
        """Appends the parameters of ``group`` that have a gradient, and their state (created on
        first sight), to the lists that ``_step_group`` takes."""
        momentum_dtype = group["momentum_dtype"]
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse and is_dtensor(p):
                raise ValueError("SM3 does not support sparse gradients of sharded (DTensor) parameters")
            state = self.state[p]
            if not state:
                _init_state(p, state)
            if group["momentum"] > 0 and not grad.is_sparse and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=momentum_dtype or p.dtype, memory_format=torch.preserve_format
                )
            params.append(p)
            grads.append(grad)
            accumulators.append(_accumulators(p, state))
            momentum_buffers.append(state.get("momentum_buffer"))
            state_steps.append(state["step"])
            fusable.append(group["fused"] is not False and _fused.supports(local(p), local(grad), momentum_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending_max: dict = {}  # sharded parameters' maxima, all-reduced once at the end
        for group in self.param_groups:
            params, grads, accumulators, momentum_buffers, state_steps, fusable = [], [], [], [], [], []
            self._gather_group(group, params, grads, accumulators, momentum_buffers, state_steps, fusable)
            _step_group(params, grads, accumulators, momentum_buffers, state_steps, fusable,
                        Hyperparams.of(group), pending_max)
        all_reduce_max(pending_max)
        return loss

    def __setstate__(self, state: dict) -> None:
        # State saved by older versions (and by torch's older format): keys added since get
        # their defaults, and a Python-number step becomes the float32 tensor we keep.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in _ADDED_GROUP_KEYS.items():
                group.setdefault(key, default)
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not torch.is_tensor(step):
                param_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to the parameter's dtype on load; our float32
        # statistics of half-precision parameters must keep their dtype to resume exactly.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in saved_state.get(saved_id, {}).items():
                if isinstance(value, Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)
            if self.state.get(p) and not is_dtensor(p):
                _adopt_earlier_layout(p, self.state[p])


# Param-group keys that state dicts of older versions may lack, with the defaults of __init__.
_ADDED_GROUP_KEYS = dict(weight_decay=0.0, maximize=False, foreach=None, fused=None, momentum_dtype=None)


def _adopt_earlier_layout(p: Tensor, state: dict) -> None:
    """Converts in place the state of the earlier PyTorch SM3 port, if that is what ``state``
    holds: ``accumulator_r`` shaped to broadcast along dimension r (1-D here; a sparse gradient
    kept only ``accumulator_0``, and the others start at zero), ``accumulator_0`` for rank
    <= 1 (``accumulator`` here), and ``momentum_buffer = 0.`` before the first momentum step
    (no buffer here: it starts at zero)."""
    dtype = _stats_dtype(p.dtype)
    if p.dim() <= 1:
        if "accumulator" not in state and "accumulator_0" in state:
            state["accumulator"] = state.pop("accumulator_0").reshape(p.shape).to(dtype)
    elif "accumulator_0" in state:
        for r, n in enumerate(p.shape):
            acc = state.get(f"accumulator_{r}")
            state[f"accumulator_{r}"] = (torch.zeros(n, dtype=dtype, device=p.device) if acc is None
                                         else acc.reshape(n).to(dtype))
    if "momentum_buffer" in state and not torch.is_tensor(state["momentum_buffer"]):
        del state["momentum_buffer"]


def _init_state(p: Tensor, state: dict) -> None:
    state["step"] = torch.tensor(0.0)
    dtype = _stats_dtype(p.dtype)
    if p.dim() <= 1:
        state["accumulator"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    else:
        for r, n in enumerate(p.shape):
            state[f"accumulator_{r}"] = (
                dim_accumulator(p, r, dtype) if is_dtensor(p) else torch.zeros(n, dtype=dtype, device=p.device)
            )


def _accumulators(p: Tensor, state: dict) -> list[Tensor]:
    if p.dim() <= 1:
        return [state["accumulator"]]
    return [state[f"accumulator_{r}"] for r in range(p.dim())]


class _FusedBatch(NamedTuple):
    """The fused kernel's arguments for the parameters of one device, in ``_fused.fused_step``'s order."""

    params: list[Tensor]
    grads: list[Tensor]
    accumulators: list[Tensor]  # flat: each parameter's accumulators in turn
    momentum_buffers: list[Tensor]  # empty when momentum = 0


def _step_group(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[list[Tensor]],
    momentum_buffers: list[Optional[Tensor]],
    state_steps: list[Tensor],
    fusable: list[bool],
    hyper: Hyperparams,
    pending_max: dict,
) -> None:
    """One SM3 step of a parameter group's lists (as gathered by ``SM3._gather_group``).

    Each parameter takes one path: sparse gradients the original's sparse step; ``fusable``
    ones the fused kernel, one call per device; the others the default path (rank 0/1
    together through ``torch._foreach_*`` ops, rank >= 2 one by one in cache-sized chunks).
    Sharded (DTensor) parameters step their local shards on these paths (the fused kernel
    reads the old accumulators, the sharded dimension's local and the others replicated, and
    overwrites them with the local maxima of nu); the maxima that run over a sharded dimension
    are collected in ``pending_max`` for the caller to all-reduce once for all groups, one MAX
    all-reduce per process group.
    """
    if not params:
        return
    torch._foreach_add_(state_steps, 1)
    sparse, diagonal, dense = [], [], []  # (param, grad, accumulators, momentum buffer)
    batches: dict[torch.device, _FusedBatch] = {}
    for p, grad, accs, buf, fuse in zip(params, grads, accumulators, momentum_buffers, fusable):
        if grad.is_sparse:
            sparse.append((p, grad, accs, buf))
            continue
        if is_dtensor(p):  # FSDP2 / tensor parallel: step the local shards
            accs = [local(a) for a in accs]
            add_max(pending_max, p, accs)
            p, grad, buf = local(p), local(grad), None if buf is None else local(buf)
            if fuse and not p.numel():  # a rank holding no rows: its maxima are of nothing
                torch._foreach_zero_(accs)
        if fuse:
            batch = batches.setdefault(p.device, _FusedBatch([], [], [], []))
            batch.params.append(p)
            batch.grads.append(grad)
            batch.accumulators.extend(accs)
            if hyper.momentum > 0:
                batch.momentum_buffers.append(buf)
        else:
            (diagonal if p.dim() <= 1 else dense).append((p, grad, accs, buf))
    if sparse or diagonal or dense:
        plain = hyper._replace(lr=float(hyper.lr))  # the default path takes a float lr
        for p, grad, accs, _ in sparse:
            _sparse_step(p, grad, accs[0], plain)
        if diagonal:
            _diagonal_steps(diagonal, plain)
        workspaces: dict = {}
        for p, grad, accs, buf in dense:
            _dense_step(p, grad, accs, buf, plain, workspaces)
    for batch in batches.values():
        _fused.fused_step(*batch, hyper)


def _workspace(workspaces: dict, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (dtype, device)
    buf = workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _diagonal_steps(items: list, hyper: Hyperparams) -> None:
    """The step of rank 0/1 parameters (diagonal Adagrad), for ``(param, grad, accumulators,
    momentum buffer)`` items.

    Cut into pieces of at most one chunk and stepped a batch of pieces at a time with
    ``torch._foreach_*`` ops: one call per op for many small tensors (biases, norms) instead of
    several per tensor, while the temporaries stay within one chunk.
    """
    batch, size = [], 0
    for p, grad, accs, buf in items:
        acc = accs[0].view(-1)
        pieces = _CHUNK_ELEMENTS if p.device.type == "cpu" else max(1, p.numel())
        for start in range(0, p.numel(), pieces):
            stop = min(start + pieces, p.numel())
            if size + stop - start > max(_CHUNK_ELEMENTS, pieces):
                _diagonal_batch(batch, hyper)
                batch, size = [], 0
            batch.append((p.view(-1)[start:stop], grad.reshape(-1)[start:stop], acc[start:stop],
                          None if buf is None else buf.view(-1)[start:stop]))
            size += stop - start
    if batch:
        _diagonal_batch(batch, hyper)


def _diagonal_batch(batch: list, hyper: Hyperparams) -> None:
    """Diagonal Adagrad on ``(param, grad, accumulator, momentum buffer)`` pieces, one
    ``torch._foreach_*`` call per op."""
    lr, momentum, beta, eps = hyper.lr, hyper.momentum, hyper.beta, hyper.eps
    decay = 1.0 - lr * hyper.weight_decay
    direction = -1.0 if hyper.maximize else 1.0  # maximize: ascend, as if g were -g
    xs, gs, accs, bufs = (list(column) for column in zip(*batch))
    dtype = accs[0].dtype
    gs = [g.to(dtype) for g in gs]
    xs32 = [x.to(dtype) for x in xs]  # the parameters themselves where already in dtype
    if beta:
        torch._foreach_mul_(accs, beta)
        torch._foreach_addcmul_(accs, gs, gs, value=1.0 - beta)
    else:
        torch._foreach_addcmul_(accs, gs, gs)
    roots = torch._foreach_add(accs, eps)
    torch._foreach_sqrt_(roots)  # sqrt(nu + eps)
    if decay != 1.0:
        torch._foreach_mul_(xs32, decay)
    if bufs[0] is None:
        torch._foreach_addcdiv_(xs32, gs, roots, value=-direction * lr)
    else:
        ms32 = [m.to(dtype) for m in bufs]
        torch._foreach_mul_(ms32, momentum)
        torch._foreach_addcdiv_(ms32, gs, roots, value=direction * (1.0 - momentum))
        torch._foreach_add_(xs32, ms32, alpha=-lr)
        for m, m32 in zip(bufs, ms32):
            if m32 is not m:
                m.copy_(m32)
    for x, x32 in zip(xs, xs32):
        if x32 is not x:
            x.copy_(x32)


# torch's fused Adagrad kernel (CPU since torch 2.4), a private op: used where present.
_fused_adagrad_ = getattr(torch, "_fused_adagrad_", None)
_ONE = torch.ones(())  # the step count it reads (unused with lr_decay = 0)


class _Plan(NamedTuple):
    """How ``_dense_step`` walks a parameter of one shape: computed once per shape."""

    views: tuple  # the shape that broadcasts accumulator r along dimension r
    row_dims: tuple  # every dimension but the first: a_1's maximum is taken over these
    share_dims: tuple  # for a_2..a_k, the dimensions of a (shares, rows, ...) view to reduce
    chunks: tuple  # (start row, stop row, shares) of each chunk
    workspace: int  # elements of the largest chunk


@functools.lru_cache(maxsize=1024)
def _plan(shape: tuple, threads: int, chunk_elements: Optional[int]) -> _Plan:
    rank, rows, row = len(shape), shape[0], math.prod(shape[1:])
    if chunk_elements:
        rows_per_chunk = max(1, chunk_elements * threads // max(1, row))
        if rows_per_chunk > threads:
            rows_per_chunk -= rows_per_chunk % threads
    else:
        rows_per_chunk = max(1, rows)
    starts = range(0, rows if row else 0, rows_per_chunk)
    chunks = tuple(
        (start, min(start + rows_per_chunk, rows),
         threads if (min(start + rows_per_chunk, rows) - start) % threads == 0 else 1)
        for start in starts
    )
    return _Plan(
        views=tuple(tuple(-1 if r == i else 1 for r in range(rank)) for i in range(rank)),
        row_dims=tuple(range(1, rank)),
        share_dims=tuple(tuple(d + 1 for d in range(rank) if d != i) for i in range(1, rank)),
        chunks=chunks,
        workspace=min(rows, rows_per_chunk) * row,
    )


def _dense_step(p: Tensor, grad: Tensor, accs: list[Tensor], buf: Optional[Tensor], hyper: Hyperparams,
                workspaces: dict) -> None:
    """In-place SM3 step for a dense gradient of a parameter of rank >= 2, in row chunks of
    dimension 0: the walk over chunks here, each chunk's arithmetic in ``_adagrad_kernel_chunk``
    or ``_plain_chunk`` (the plain form: ``tests/sm3/reference_sm3.py``)."""
    dtype = accs[0].dtype
    # Chunks keep a CPU's passes in cache. The CPU's threads each take an equal, contiguous
    # share of a chunk's elements in the elementwise ops; the maxima of a_2..a_k are taken per
    # share (see ``_Maxima``). On an accelerator each op is a kernel launch, so one chunk is faster.
    on_cpu = p.device.type == "cpu"
    threads = torch.get_num_threads() if on_cpu else 1
    plan = _plan(tuple(p.shape), threads, _CHUNK_ELEMENTS if on_cpu else None)
    # With beta = 0, eps is folded into the (small) accumulators: min_r (a_r + eps) + g^2
    # is nu + eps up to rounding, which saves a full pass; it is taken off again at the end.
    shift = hyper.eps if not hyper.beta else 0.0
    if shift:
        torch._foreach_add_(accs, shift)
    # torch's fused Adagrad kernel takes nu += g^2 and the update in one pass where it can:
    # beta = 0 (eps folded), on CPU, everything in the statistics dtype.
    one_pass = (shift and on_cpu and _fused_adagrad_ is not None and p.dtype == dtype
                and grad.dtype == dtype and (buf is None or buf.dtype == dtype))
    views = [a.view(shape) for a, shape in zip(accs, plan.views)]
    maxima = _Maxima(accs, threads, plan)
    ws = _workspace(workspaces, plan.workspace, dtype, p.device)
    for start, stop, shares in plan.chunks:
        g = grad[start:stop]
        if g.dtype != dtype:
            g = g.to(dtype)
        nu = ws[: g.numel()].view(g.shape)
        if len(views) == 2:
            torch.minimum(views[0][start:stop], views[1], out=nu)
        else:
            nu.copy_(views[0][start:stop].expand_as(nu))
            for v in views[1:]:
                torch.minimum(nu, v, out=nu)
        chunk = _Chunk(p[start:stop], g, nu, None if buf is None else buf[start:stop], start, stop, shares)
        if one_pass:
            _adagrad_kernel_chunk(chunk, hyper, maxima)
        else:
            _plain_chunk(chunk, hyper, maxima, eps_folded=bool(shift))
    maxima.finish()
    if shift:
        torch._foreach_sub_(accs, shift)


class _Chunk(NamedTuple):
    """Rows ``start:stop`` of a parameter of rank >= 2, as ``_dense_step`` hands them on."""

    x: Tensor  # the parameter's rows (the parameter's dtype)
    g: Tensor  # the gradient's rows, in the statistics dtype
    nu: Tensor  # workspace holding min_r a_r over these rows (+ eps when folded)
    m: Optional[Tensor]  # the momentum buffer's rows, or None
    start: int
    stop: int
    shares: int  # the threads' shares that the rows divide into (1 when they do not divide)


class _Maxima:
    """The new accumulators a_r[j] = max {nu : i_r = j}, gathered chunk by chunk.

    a_1 of a chunk's rows is final once the chunk is done. The maxima of a_2..a_k are kept
    per thread's share (the rows of ``partial``) and reduced after the sweep, so that each
    thread reads the rows it just wrote from its own core's cache: reading columns across
    shares measured ~15% slower."""

    def __init__(self, accs: list[Tensor], threads: int, plan: _Plan):
        self.accs = accs
        self.plan = plan
        self.partial = [torch.zeros(threads, a.numel(), dtype=a.dtype, device=a.device) for a in accs[1:]]

    def add(self, c: _Chunk) -> None:
        # The chunk's rows of a_1 were read into nu before this, so they may be overwritten.
        torch.amax(c.nu, dim=self.plan.row_dims, out=self.accs[0][c.start:c.stop])
        nu_shares = c.nu.view(c.shares, -1, *c.nu.shape[1:])
        for new, dims in zip(self.partial, self.plan.share_dims):
            torch.maximum(new[:c.shares], torch.amax(nu_shares, dim=dims), out=new[:c.shares])

    def finish(self) -> None:
        for a, new in zip(self.accs[1:], self.partial):
            torch.amax(new, dim=0, out=a)


def _adagrad_kernel_chunk(c: _Chunk, hyper: Hyperparams, maxima: _Maxima) -> None:
    """beta = 0 on CPU: torch's own fused Adagrad kernel (a built-in op, no compiler) does
    nu += g^2 and x -= lr * g / sqrt(nu) in one pass over memory, where addcmul, sqrt and
    addcdiv took three (the whole step measured ~25% faster)."""
    lr, momentum = hyper.lr, hyper.momentum
    decay = 1.0 - lr * hyper.weight_decay
    if decay != 1.0:
        c.x.mul_(decay)
    # eps is already folded into nu, so it runs with eps = 0 (Adagrad adds its eps after the
    # square root). With momentum it updates the buffer instead, with step size -(1 - momentum).
    target, step_size = (c.x, lr) if c.m is None else (c.m.mul_(momentum), momentum - 1.0)
    _fused_adagrad_([target], [c.g], [c.nu], [_ONE], lr=step_size, lr_decay=0.0, weight_decay=0.0,
                    eps=0.0, maximize=hyper.maximize)
    if c.m is not None:
        c.x.add_(target, alpha=-lr)
    maxima.add(c)


def _plain_chunk(c: _Chunk, hyper: Hyperparams, maxima: _Maxima, eps_folded: bool) -> None:
    """Any beta, device and dtype: nu, the maxima, then the update, one torch op at a time."""
    lr, momentum, beta = hyper.lr, hyper.momentum, hyper.beta
    decay = 1.0 - lr * hyper.weight_decay
    direction = -1.0 if hyper.maximize else 1.0  # maximize: ascend, as if g were -g
    nu, g = c.nu, c.g
    if beta:
        nu.mul_(beta).addcmul_(g, g, value=1.0 - beta)
    else:
        nu.addcmul_(g, g)
    maxima.add(c)
    if not eps_folded:
        nu.add_(hyper.eps)
    # sqrt, then divide inside addcdiv: rsqrt (a square root and a divide) and a multiply
    # measured ~2x slower on CPU for the same numbers up to rounding.
    root = nu.sqrt_()
    dtype = nu.dtype
    x32 = c.x if c.x.dtype == dtype else c.x.to(dtype)
    if decay != 1.0:
        x32.mul_(decay)
    if c.m is None:
        x32.addcdiv_(g, root, value=-direction * lr)
    else:
        m32 = c.m if c.m.dtype == dtype else c.m.to(dtype)
        m32.mul_(momentum).addcdiv_(g, root, value=direction * (1.0 - momentum))
        if m32 is not c.m:
            c.m.copy_(m32)
        x32.add_(m32, alpha=-lr)
    if x32 is not c.x:
        c.x.copy_(x32)


def _sparse_step(p: Tensor, grad: Tensor, acc: Tensor, hyper: Hyperparams) -> None:
    """The original's sparse path: only rows present, only the first-dimension accumulator."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"SM3 supports sparse gradients with one sparse dimension (as from nn.Embedding), "
            f"got sparse_dim={grad.sparse_dim()}; densify the gradient with .to_dense()"
        )
    lr, beta, eps = hyper.lr, hyper.beta, hyper.eps
    grad = grad.coalesce()  # sums duplicate indices
    index = grad.indices()[0]
    g = grad.values().to(acc.dtype)
    rows = acc.index_select(0, index).view([-1] + [1] * (g.dim() - 1))
    nu = rows * beta + (1.0 - beta) * g * g if beta else rows + g * g
    acc.index_copy_(0, index, nu.amax(dim=tuple(range(1, nu.dim()))) if nu.dim() > 1 else nu)
    update = g * torch.rsqrt(nu + eps)
    if hyper.maximize:
        update.neg_()
    x = p.index_select(0, index).to(acc.dtype)
    if hyper.weight_decay:
        x.mul_(1.0 - lr * hyper.weight_decay)
    p.index_copy_(0, index, x.add_(update, alpha=-lr).to(p.dtype))
