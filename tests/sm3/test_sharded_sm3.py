"""SM3 on FSDP2-sharded parameters (2 CPU processes, gloo) against single-device SM3."""

import copy

import pytest
import torch
import torch.distributed as dist

from scripts.sharded_state import state_bytes_per_rank
from sm3 import SM3, optimizer_state_bytes

pytestmark = [pytest.mark.slow,  # spawns two ranks
              pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")]

# Uneven rows (7 over 2 ranks), a single row (one rank holds none), 1-D, rank 3 and 4.
SHAPES = [(7, 5), (1, 6), (5,), (3, 4, 2), (2, 3, 2, 2)]


class Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in SHAPES)

    def forward(self, inputs):
        return sum(((w * x).sum() ** 2) for w, x in zip(self.weights, inputs))


def _inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        model(_inputs(step)).backward()
        opt.step()
        opt.zero_grad()


def _worker(rank, world_size, store, momentum, checkpoint_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        reference = Params()
        model = copy.deepcopy(reference)
        mesh = init_device_mesh("cpu", (world_size,))
        fully_shard(model, mesh=mesh)
        hparams = dict(lr=0.1, momentum=momentum, beta=0.0, weight_decay=0.01)
        opt, ref_opt = SM3(model.parameters(), **hparams), SM3(reference.parameters(), **hparams)
        _train(model, opt, 3)
        _train(reference, ref_opt, 3)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)
            for key, value in ref_opt.state[q].items():
                got = opt.state[p][key]
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7, msg=key)
            # the row accumulator is sharded with the parameter, never gathered
            if p.dim() >= 2:
                assert opt.state[p]["accumulator_0"].to_local().shape[0] == p.to_local().shape[0]

        # the per-rank memory that scripts/sharded_state.py predicts (+ one float32 step each)
        predicted = state_bytes_per_rank(SHAPES, world_size, "sm3_momentum" if momentum else "sm3", rank)
        assert optimizer_state_bytes(opt) == predicted + 4 * len(SHAPES)

        if checkpoint_dir is None:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
        torch.manual_seed(1)  # different initial values, overwritten by the load
        restored = Params()
        fully_shard(restored, mesh=mesh)
        restored_opt = SM3(restored.parameters(), **hparams)
        model_sd, optim_sd = get_state_dict(restored, restored_opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_state_dict(restored, restored_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        _train(model, opt, 2, first=3)
        _train(restored, restored_opt, 2, first=3)
        for p, q in zip(model.parameters(), restored.parameters()):
            assert torch.equal(p.full_tensor(), q.full_tensor())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fsdp2_matches_single_device(tmp_path, spawn_ranks, momentum):
    spawn_ranks(_worker, momentum, str(tmp_path / "ckpt") if momentum else None)
