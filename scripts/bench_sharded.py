"""The optimizer step on FSDP2-sharded Transformer parameters: SM3 against Adam, on CPU.

Two gloo ranks (torchrun), ``fully_shard`` per block (embedding, each encoder and decoder layer,
the final norms) over the shapes of ``scripts/_shapes.py``. Only ``optimizer.step()`` is timed,
with the same random gradients every step; the optimizers run in interleaved rounds (each
round times every optimizer once, so a shared machine's drifts hit all alike) and the table
shows medians over rounds, rank 0's clock after a barrier. Collectives and bytes are counted
by wrapping ``torch.distributed.all_reduce`` during one step (SM3's only communication;
Adam has none). Writes a markdown table to ``docs/bench_sharded.md``.

    uv run torchrun --nproc-per-node 2 scripts/bench_sharded.py --model base --rounds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scripts._shapes import MODELS, model_shapes
from sm3 import SM3

OPTIMIZERS = {
    "SM3 (momentum 0)": lambda params: SM3(params, lr=0.1),
    "SM3 (momentum 0.9)": lambda params: SM3(params, lr=0.1, momentum=0.9),
    "SM3 (momentum 0.9, bfloat16 buffer)": lambda params: SM3(params, lr=0.1, momentum=0.9,
                                                              momentum_dtype=torch.bfloat16),
    "Adam (fused)": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
    "Adam (foreach)": lambda params: torch.optim.Adam(params, lr=1e-3, foreach=True),
}
BASELINE = "Adam (fused)"


def sharded_model(shapes, mesh) -> torch.nn.Module:
    """One module per block (the name up to its layer index), each ``fully_shard``-ed."""
    from torch.distributed.fsdp import fully_shard

    blocks: dict[str, list] = {}
    for name, shape in shapes:
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[1].isdigit() else parts[0]
        blocks.setdefault(block, []).append(shape)
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList()
    for block_shapes in blocks.values():
        block = torch.nn.Module()
        block.params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, device=mesh.device_type) * 0.02)
                                              for s in block_shapes)
        fully_shard(block, mesh=mesh)
        root.blocks.append(block)
    fully_shard(root, mesh=mesh)
    return root


def random_grads(params, seed: int) -> list:
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(seed)
    grads = []
    for p in params:
        local = torch.randn(p.to_local().shape, generator=gen).to(p.device)
        grads.append(DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()))
    return grads


def communication(opt) -> tuple[int, int]:
    """(all-reduce calls, bytes all-reduced) of one step of ``opt``, on this rank."""
    calls, nbytes, real = [0], [0], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls[0] += 1
        nbytes[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        opt.step()
    finally:
        dist.all_reduce = real
    return calls[0], nbytes[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="base")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="threads per rank (0: cores / ranks)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_sharded.md"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU per rank")
    args = parser.parse_args(argv)
    from torch.distributed.device_mesh import init_device_mesh

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    spec = MODELS[args.model]
    shapes = model_shapes(spec)
    mesh = init_device_mesh(args.device, (world,))
    runs = {}
    for label, make in OPTIMIZERS.items():
        model = sharded_model(shapes, mesh)
        params = list(model.parameters())
        for p, g in zip(params, random_grads(params, rank)):
            p.grad = g
        opt = make(params)
        opt.step()  # creates the state (and builds SM3's kernel once)
        runs[label] = (opt, communication(opt), [])
    for _ in range(args.rounds):
        for label, (opt, _, times) in runs.items():
            dist.barrier()
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            times.append(1e3 * (time.perf_counter() - start))
    if rank:
        dist.destroy_process_group()
        return
    base = statistics.median(runs[BASELINE][2])
    params = sum(torch.Size(s).numel() for _, s in shapes)
    lines = [
        f"# Sharded optimizer step: {spec.name}, {params / 1e6:.1f}M parameters, FSDP2 over {world} "
        f"{'NCCL ranks (CUDA)' if args.device == 'cuda' else 'gloo ranks (CPU)'}",
        "",
        f"`uv run torchrun --nproc-per-node {world} scripts/bench_sharded.py --model {args.model} "
        f"--rounds {args.rounds}`; torch {torch.__version__}, {torch.get_num_threads()} threads per rank, "
        f"{os.cpu_count()} cores. Step time: median over {args.rounds} interleaved rounds (rank 0, "
        "between barriers); collectives and bytes: one step on rank 0.",
        "",
        f"| optimizer | step ms (median) | p25–p75 ms | × {BASELINE} | all-reduces / step | KiB all-reduced / step / rank |",
        "|---|---|---|---|---|---|",
    ]
    for label, (_, (calls, nbytes), times) in runs.items():
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        lines.append(f"| {label} | {statistics.median(times):.1f} | {q[0]:.1f}–{q[2]:.1f} | "
                     f"{statistics.median(times) / base:.2f} | {calls} | {nbytes / 1024:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
