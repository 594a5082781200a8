"""Where a training step's time goes on this machine, and what bfloat16 autocast changes.

For one model (default `model=transformer`, the paper's base, on the built-in data as
`python train.py optim=sm3 model=transformer` runs it), in one process:
1. the step time in float32 and under bf16 autocast, the two alternating for `--rounds` rounds
   (medians: a shared machine's drift hits both);
2. a torch.profiler breakdown of the step by kind of op (matmuls, attention, elementwise and
   normalisation, casts, the optimizer, the rest), for each precision;
3. the training loss of `--curve-steps` steps from the same initialisation in each precision.

    uv run python scripts/profile_step.py                        # writes docs/profile_cpu.md
    uv run python scripts/profile_step.py model=transformer_tiny --curve-steps 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from scripts.bench_loop import compose
from trainer.machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
KINDS = {  # kind -> substrings of aten op names, first match wins
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear"),
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax"),
    "cast": ("_to_copy", "aten::to", "copy_", "_autocast"),
    "optimizer": ("sm3", "_foreach", "Optimizer", "fused_step"),
    "elementwise / norm": ("add", "mul", "div", "sub", "gelu", "relu", "dropout", "layer_norm", "native_layer_norm",
                           "where", "masked_fill", "embedding", "cross_entropy", "log_softmax", "nll_loss", "sum",
                           "mean", "exp", "sqrt", "rsqrt", "pow", "neg", "fill_", "zero_", "bernoulli"),
}


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS.items():
        if any(k.lower() in low for k in keys):
            return kind
    return "other"


class Stepper:
    """One model, optimizer and batch stream; `step(precision)` trains one step."""

    def __init__(self, cfg):
        from models.transformer import sequence_loss
        from trainer.optim import build_optimizer
        from trainer.tasks import build_task

        torch.manual_seed(cfg.trainer.seed)
        torch.set_flush_denormal(cfg.trainer.flush_denormal)
        self.task = build_task(cfg, cfg.trainer.seed)
        self.model = self.task.build_model()
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.batches = self.task.train_batches(0, 0, 1)
        self.index, self.sequence_loss = 0, sequence_loss

    def step(self, precision: str) -> tuple[float, float, int]:
        """(seconds, loss, tokens) of one step in `precision` ("fp32" or "bf16")."""
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = self.task.train_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item(), batch.num_tokens


def breakdown(stepper: Stepper, precision: str, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step by kind of op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step(precision)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1000 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: optim=sm3 model=transformer)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps per precision per round")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--curve-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "profile_cpu.md")
    args = parser.parse_args()
    overrides = ["optim=sm3", "model=transformer", "logger=none", *args.overrides]
    cfg = compose(overrides)
    started = time.time()

    stepper = Stepper(cfg)
    for precision in ("fp32", "bf16"):  # warm-up: kernel builds, allocations, oneDNN primitives
        stepper.step(precision)
    times = {"fp32": [], "bf16": []}
    tokens = []
    for _ in range(args.rounds):
        for precision in times:
            for _ in range(args.steps):
                seconds, _, n = stepper.step(precision)
                times[precision].append(seconds)
                tokens.append(n)
    per_token = statistics.median(tokens)
    split = {p: breakdown(stepper, p, args.profile_steps) for p in times}

    curves = {}
    for precision in times:  # the same initialisation and batches for both
        fresh = Stepper(cfg)
        curves[precision] = [fresh.step(precision)[1] for _ in range(args.curve_steps)]

    fp32, bf16 = (statistics.median(times[p]) for p in ("fp32", "bf16"))
    lines = [f"# Step profile: `{' '.join(overrides)}` on this CPU", "",
             f"`uv run python scripts/profile_step.py {' '.join(args.overrides)}` "
             f"({time.time() - started:.0f} s). Median of {len(times['fp32'])} steps per precision, alternating; "
             f"~{per_token:.0f} target tokens a step. CPU: {cpu_description()} (torch's capability "
             f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads.", "",
             "| precision | s / step | tokens/s | x float32 |", "| --- | ---: | ---: | ---: |",
             f"| float32 | {fp32:.3f} | {per_token / fp32:.0f} | 1.00 |",
             f"| bf16 autocast | {bf16:.3f} | {per_token / bf16:.0f} | {bf16 / fp32:.2f} |", "",
             "Self CPU time per step by kind of op (torch.profiler, ms):", "",
             "| kind | float32 | bf16 autocast |", "| --- | ---: | ---: |"]
    kinds = sorted({k for s in split.values() for k in s}, key=lambda k: -split["fp32"].get(k, 0.0))
    lines += [f"| {k} | {split['fp32'].get(k, 0.0):.0f} | {split['bf16'].get(k, 0.0):.0f} |" for k in kinds]
    lines += [f"| **all** | **{sum(split['fp32'].values()):.0f}** | **{sum(split['bf16'].values()):.0f}** |", "",
              f"Training loss over {args.curve_steps} steps from the same initialisation and batches:", "",
              "| step | float32 | bf16 autocast |", "| ---: | ---: | ---: |"]
    marks = sorted({0, *range(4, args.curve_steps, max(1, args.curve_steps // 6)), args.curve_steps - 1})
    lines += [f"| {i + 1} | {curves['fp32'][i]:.4f} | {curves['bf16'][i]:.4f} |" for i in marks]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
