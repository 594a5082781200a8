"""Devices and processes: torchrun (or SLURM) process groups, FSDP2 sharding, and the loop's collectives.

Every collective here runs on a tensor of the device the process group's backend takes (the GPU under
NCCL, the CPU under gloo): NCCL rejects CPU tensors.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sm3._sharding import is_dtensor  # noqa: F401  the one DTensor test, shared with the optimizer
from trainer.errors import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def slurm_to_torchrun_environment() -> None:
    """Under SLURM with several tasks per job and no torchrun (hydra/launcher=slurm with
    tasks_per_node > 1, or `srun python train.py`), set torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, through submitit's helper."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as error:
        raise RuntimeError("several SLURM tasks but no torchrun variables: launch with torchrun, or install "
                           "submitit (uv run --group sweeps ...) to derive them from SLURM's") from error
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # set by submitit's launcher; not under a bare srun
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def rank() -> int:
    """This process's rank: the process group's, or torchrun's RANK before the group exists (0 alone)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes a run's shared files."""
    return rank() == 0


def init_distributed(device: torch.device, fsdp: bool = False) -> tuple[int, int]:
    """(rank, world size): torchrun (or SLURM, see above) sets WORLD_SIZE; NCCL (and gloo) on CUDA, gloo on CPU.
    FSDP needs a process group even for a single torchrun process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise ConfigError("trainer.parallel=fsdp needs torchrun: torchrun --nproc_per_node=N train.py "
                          "trainer.parallel=fsdp ...")
    if (world_size > 1 or fsdp) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # On GPUs NCCL carries the CUDA tensors, and gloo any CPU tensor (DCP's planning, a stray scalar).
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return (rank(), world_size) if dist.is_initialized() else (0, 1)


def shard_model(model: torch.nn.Module, device: torch.device, blocks, forward_methods=()) -> None:
    """FSDP2 in place: each block is a unit (all-gathered just before it runs, freed after), then the
    root (embedding, final norms). Parameters become DTensors sharded over the ranks. Methods other
    than forward that run the model (decoding) are named in ``forward_methods``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in forward_methods:
        register_fsdp_forward_method(model, method)


def collective_device() -> torch.device:
    """Where a collective's tensor must live for the default process group's backend: NCCL takes CUDA tensors only."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op=None) -> list[float]:
    """Python numbers reduced over every rank (a sum unless ``op``, e.g. dist.ReduceOp.MAX), in float64."""
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor.tolist()
