"""What one evaluation costs: the validation split decoded with the key/value cache against decoding the whole
prefix each step (what train.py did before the cache), alternating in one process.

The model is the config's, freshly initialised, so it never emits end-of-sentence and every sentence is decoded
to its length limit (min(trainer.eval_max_len, 1.5 x source length + 10)): the worst case, and what the first
evaluations of a run look like. Both give the same translations (tests/test_models_decode.py).

    uv run python scripts/bench_eval.py                       # the main job's model and data
    uv run python scripts/bench_eval.py model=transformer trainer.precision=bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scripts.bench_loop import compose
from trainer.machine import cpu_description


def main() -> None:
    from train import autocast_context
    from trainer.tasks import build_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: the main job's)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = compose(["optim=sm3", "model=transformer_tiny", "logger=none", *args.overrides])
    torch.manual_seed(cfg.trainer.seed)
    task = build_task(cfg, cfg.trainer.seed)
    model = task.build_model().eval()
    autocast = autocast_context(cfg.trainer.precision.value, torch.device("cpu"))
    generate = model.generate
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for use_cache in times:
            model.generate = lambda *a, **k: generate(*a, **k, use_cache=use_cache)  # noqa: B023 (called at once)
            start = time.perf_counter()
            task.evaluate(model, "valid", torch.device("cpu"), autocast)
            times[use_cache].append(time.perf_counter() - start)
    cached, whole = (statistics.median(times[c]) for c in (True, False))
    sentences = len(task.data.targets["valid"])
    print(f"`uv run python scripts/bench_eval.py {' '.join(args.overrides)}` on {cpu_description()}, "
          f"{torch.get_num_threads()} threads; {sentences} validation sentences, medians of {args.rounds}:\n\n"
          "| decoding | s per evaluation |\n| --- | ---: |\n"
          f"| whole prefix each step (before) | {whole:.2f} |\n| key/value cache | {cached:.2f} |\n\n"
          f"The cache takes {cached / whole:.2f}x the time.")


if __name__ == "__main__":
    main()
