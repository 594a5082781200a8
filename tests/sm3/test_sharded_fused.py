"""The fused kernel on sharded (DTensor) parameters, 2 CPU processes (gloo): the same numbers as
single-device SM3, and one MAX all-reduce per process group per step."""

import copy

import pytest
import torch
import torch.distributed as dist

from sm3 import SM3, _fused

pytestmark = [
    pytest.mark.slow,  # spawns two ranks
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
    pytest.mark.skipif(not _fused.native_available(), reason="the CPU kernel did not build"),
]

# Uneven rows (7 over 2 ranks), one row (a rank holds none), 1-D, rank 3 and 4, bfloat16.
SHAPES = [(7, 5), (1, 6), (5,), (3, 4, 2), (2, 3, 2, 2), (33, 40)]
HPARAMS = [
    dict(momentum=0.0, beta=0.0),
    dict(momentum=0.9, beta=0.0, weight_decay=0.01),
    dict(momentum=0.9, beta=0.5, weight_decay=0.1, maximize=True),
    dict(momentum=0.9, beta=0.0, momentum_dtype=torch.bfloat16),
]


class Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in SHAPES)

    def forward(self, inputs):
        return sum(((w * x).sum() ** 2) for w, x in zip(self.weights, inputs))


def _inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _all_reduces_of_step(opt) -> list[int]:
    """The element count of each all-reduce one ``opt.step()`` issues."""
    calls, real = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        opt.step()
    finally:
        dist.all_reduce = real
    return calls


def _fsdp_worker(rank, world_size, store, hparams):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        reference = Params()
        model = copy.deepcopy(reference)
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        opt = SM3(model.parameters(), lr=0.1, fused=True, **hparams)
        ref_opt = SM3(reference.parameters(), lr=0.1, fused=False, **hparams)
        launches, real_launch = [], _fused._launch
        _fused._launch = lambda params, *rest: launches.append(len(params)) or real_launch(params, *rest)
        for step in range(3):
            model(_inputs(step)).backward()
            reference(_inputs(step)).backward()
            calls = _all_reduces_of_step(opt)
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            # every replicated accumulator in one buffer: one all-reduce for the one process group
            replicated = sum(sum(s[1:]) for s in SHAPES if len(s) >= 2)
            assert calls == [replicated], calls
        assert sum(launches) == 3 * len(SHAPES), launches  # every parameter through the kernel
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-6)
            for key, value in ref_opt.state[q].items():
                got = opt.state[p][key]
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-6
                torch.testing.assert_close(got, value, rtol=tol, atol=tol, msg=key)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hparams", HPARAMS, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()))
def test_fused_fsdp2_matches_single_device_with_one_all_reduce(spawn_ranks, hparams):
    spawn_ranks(_fsdp_worker, hparams)


def _tensor_parallel_worker(rank, world_size, store):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        gen = torch.Generator().manual_seed(3)
        # column-wise (Shard(1)) and row-wise (Shard(0)) splits, as tensor parallelism makes them
        layout = [((6, 7), 1), ((5, 3, 4), 1), ((9, 4), 0), ((3, 4, 5), 2)]
        starts = [torch.randn(shape, generator=gen) for shape, _ in layout]
        sharded = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(d)])) for t, (_, d) in zip(starts, layout)]
        plain = [torch.nn.Parameter(t.clone()) for t in starts]
        hparams = dict(lr=0.1, momentum=0.9, beta=0.5, weight_decay=0.01)
        opt, ref_opt = SM3(sharded, fused=True, **hparams), SM3(plain, fused=False, **hparams)
        for _ in range(3):
            for p, q, (_, d) in zip(sharded, plain, layout):
                g = torch.randn(q.shape, generator=gen)
                q.grad, p.grad = g, distribute_tensor(g, mesh, [Shard(d)])
            calls = _all_reduces_of_step(opt)
            ref_opt.step()
            assert len(calls) == 1, calls
        for p, q in zip(sharded, plain):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-6)
            for key, value in ref_opt.state[q].items():
                got = opt.state[p][key]
                torch.testing.assert_close(got.full_tensor() if hasattr(got, "full_tensor") else got, value,
                                           rtol=1e-6, atol=1e-6, msg=key)
    finally:
        dist.destroy_process_group()


def test_fused_tensor_parallel_placements_match_single_device(spawn_ranks):
    spawn_ranks(_tensor_parallel_worker)
