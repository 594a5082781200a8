"""The training loop's overhead: train.py against a bare forward/backward/step loop on the same batches.

Both run the same model, optimizer, schedule and batches (the built-in data, the config's
defaults plus any overrides given). The bare loop is zero_grad, forward, loss, backward,
optimizer step, scheduler step and nothing else; train.py adds the data position, gradient
norm / NaN check, Polyak averaging, logging and the progress bar (evaluation and checkpoints
are pushed past the end of the run: they are not per-step costs). Throughput is the median
tokens/s over windows of `trainer.log_interval` steps, the first windows dropped as warm-up;
the two loops alternate for `--rounds` rounds so that a shared machine's drifts hit both.

    uv run python scripts/bench_loop.py                            # tiny Transformer, SM3, CPU
    uv run python scripts/bench_loop.py --steps 300 --rounds 3 optim=adam
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import compose
from trainer.machine import cpu_description  # the one composer; scripts.study* and profile_step import it from here

ROOT = Path(__file__).resolve().parents[1]

WINDOW = 10  # steps per throughput sample
WARMUP_WINDOWS = 2


def bare_loop(cfg, steps: int) -> list[float]:
    """tokens/s per window of WINDOW steps of the plainest loop on train.py's batches."""
    from data import load_translation_data
    from models import build_model
    from models.transformer import sequence_loss
    from trainer.optim import build_optimizer
    from trainer.schedule import build_scheduler

    torch.manual_seed(cfg.trainer.seed)
    torch.set_flush_denormal(cfg.trainer.flush_denormal)  # as train.py: same arithmetic, same speed
    data = load_translation_data(cfg.data, seed=cfg.trainer.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size, data.tokenizer.pad_id)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.trainer.max_steps)
    batches, epoch, index = data.batches("train", epoch=0), 0, 0
    rates, tokens, start = [], 0, time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if index == len(batches):
            epoch, index = epoch + 1, 0
            batches = data.batches("train", epoch=epoch)
        batch = batches[index]
        index += 1
        optimizer.zero_grad(set_to_none=True)
        loss = sequence_loss(model(batch.src, batch.tgt_in), batch.tgt_out, model.pad_id,
                                cfg.model.label_smoothing)
        (loss / batch.num_tokens).backward()
        optimizer.step()
        scheduler.step()
        tokens += batch.num_tokens
        if step % WINDOW == 0:
            now = time.perf_counter()
            rates.append(tokens / (now - start))
            tokens, start = 0, now
    return rates[WARMUP_WINDOWS:]


def train_py(overrides: list[str], steps: int, workdir: Path) -> list[float]:
    """tokens/s per logged window of the real train.py (its metrics.jsonl)."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    args = [*overrides, f"trainer.log_interval={WINDOW}",
            f"trainer.eval_interval={steps + 1}", f"trainer.checkpoint_interval={steps + 1}",
            "trainer.max_minutes=null", "logger=none", f"hydra.run.dir={run_dir}"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                            cwd=workdir)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r and r["step"] < steps]
    return rates[WARMUP_WINDOWS:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per loop and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. optim=adam")
    args = parser.parse_args()
    # The same max_steps for both loops: the schedule (its warm-up is a share of the run) changes the
    # numbers the model computes, and with them the speed (denormal floats).
    overrides = ["trainer.polyak=true", f"trainer.max_steps={args.steps}", *args.overrides]
    cfg = compose(overrides)
    bare, full = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            bare += bare_loop(cfg, args.steps)
            full += train_py(overrides, args.steps, Path(tmp))
    bare_rate, full_rate = statistics.median(bare), statistics.median(full)
    overhead = bare_rate / full_rate - 1  # extra time per step, relative to the bare loop's
    command = " ".join(["uv run python scripts/bench_loop.py", *sys.argv[1:]])
    table = "\n".join([
        f"`{command}`",
        "",
        f"Loop overhead: {cfg.model.d_model}-wide model, {cfg.optim.name.value}, data.max_tokens={cfg.data.max_tokens}, "
        f"{args.rounds} x {args.steps} steps per loop, {torch.get_num_threads()} threads, "
        f"{cpu_description()}; medians of {WINDOW}-step windows.",
        "",
        "| loop | tokens/s (median) | windows |",
        "| --- | --- | --- |",
        f"| bare forward/backward/step | {bare_rate:.0f} | {len(bare)} |",
        f"| train.py (averaging, logging, NaN check, progress) | {full_rate:.0f} | {len(full)} |",
        "",
        f"train.py's overhead: {100 * overhead:+.1f}% of the bare loop's step time (target: at most +10%).",
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
