"""Why SM3 with momentum 0.9 stalls on the study's translation task: the first steps measured, and the
momentum path checked on the study model's own gradients (docs/study/README.md, "Momentum").

    uv run python scripts/study_momentum.py             # both, ~4 min on 2 CPU cores
    uv run python scripts/study.py --part momentum      # the same, inside the study (with its full runs)

1. ``trace``: the study's SM3 run (experiment=study/mt_sm3) for ``STEPS`` steps at each of ``SETTINGS``,
   recording every step the training loss, the learning rate and, per kind of parameter (embedding,
   attention, feed-forward, vectors: biases and norms), the RMS of the update divided by the learning rate
   (the size of ``u`` or ``m`` in the README's pseudocode) and the mean accumulator entry (``nu``'s scale).
2. ``paths``: ``PATH_STEPS`` steps of the same model, one gradient stream (that of the fused run) fed to
   ``SM3(fused=True)``, ``SM3(fused=False)`` and the float64 reference of tests/sm3/reference_sm3.py, with
   momentum 0.9: the largest parameter difference between each pair, relative to the parameters' scale.

Writes ``<runs>/momentum.json``; scripts/study_report.py draws and tabulates it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch

from scripts.bench_loop import compose
from trainer import bernoulli

ROOT = Path(__file__).resolve().parent.parent
STEPS = 150
SETTINGS = [  # (lr, momentum, warm-up fraction of the study's 600 steps)
    (0.025, 0.0, 0.05), (0.025, 0.9, 0.05), (0.05, 0.0, 0.05), (0.05, 0.9, 0.05), (0.05, 0.9, 0.2),
]
PATH_STEPS = 200
KINDS = ("embedding", "attention", "feed-forward", "vectors")


def kind_of(name: str, p: torch.Tensor) -> str:
    if p.dim() <= 1:
        return "vectors"
    if "embedding" in name:
        return "embedding"
    return "attention" if "attn" in name else "feed-forward"


def _setup(lr: float, momentum: float, warmup: float, fused=None, seed: int = 0, overrides=()):
    from trainer.optim import build_optimizer
    from trainer.schedule import build_scheduler
    from trainer.tasks import build_task

    cfg = compose(["experiment=study/mt_sm3", f"optim.lr={lr}", f"optim.momentum={momentum}",
                   f"schedule.warmup_fraction={warmup}", f"trainer.seed={seed}",
                   *([] if fused is None else [f"optim.fused={fused}"]), *overrides])
    torch.manual_seed(seed)
    torch.set_flush_denormal(cfg.trainer.flush_denormal)
    task = build_task(cfg, seed)
    model = task.build_model()
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.trainer.max_steps)
    return task, model, optimizer, scheduler


def _loss(task, model, batch) -> torch.Tensor:
    loss = task.train_loss(model, batch)
    loss.backward()
    return loss


def trace(lr: float, momentum: float, warmup: float, steps: int = STEPS) -> dict:
    """Per step: loss, lr, and per kind the update RMS / lr and the mean accumulator entry."""
    task, model, optimizer, scheduler = _setup(lr, momentum, warmup)
    named = [(kind_of(n, p), p) for n, p in model.named_parameters()]
    batches = task.train_batches(0, 0, 1)
    rows = []
    for step in range(steps):
        before = [p.detach().clone() for _, p in named]
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(task, model, batches[step % len(batches)])
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        squares, sizes, acc_sum, acc_n = ({k: 0.0 for k in KINDS} for _ in range(4))
        for (kind, p), old in zip(named, before):
            squares[kind] += (p.detach() - old).double().pow(2).sum().item()
            sizes[kind] += p.numel()
            for key, value in optimizer.state[p].items():
                if key.startswith("accumulator"):
                    acc_sum[kind] += value.double().sum().item()
                    acc_n[kind] += value.numel()
        rows.append({"step": step + 1, "loss": loss.item(), "lr": step_lr,
                     "update_rms_over_lr": {k: math.sqrt(squares[k] / sizes[k]) / step_lr for k in KINDS},
                     "accumulator_mean": {k: acc_sum[k] / max(acc_n[k], 1) for k in KINDS}})
    return {"lr": lr, "momentum": momentum, "warmup_fraction": warmup, "steps": rows}


def _reference():
    path = ROOT / "tests" / "sm3" / "reference_sm3.py"
    spec = importlib.util.spec_from_file_location("reference_sm3", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceSM3


def paths(steps: int = PATH_STEPS, lr: float = 0.025, momentum: float = 0.9, warmup: float = 0.05,
          overrides=()) -> dict:
    """The fused kernel, the default (foreach) path and the float64 reference on one gradient stream."""
    task, fused_model, fused_opt, fused_sched = _setup(lr, momentum, warmup, fused=True, overrides=overrides)
    _, plain_model, plain_opt, plain_sched = _setup(lr, momentum, warmup, fused=False, overrides=overrides)
    plain_model.load_state_dict(fused_model.state_dict())
    reference = _reference()(lr=lr, momentum=momentum)
    ref_params = [p.detach().double().clone() for p in fused_model.parameters()]
    batches = task.train_batches(0, 0, 1)
    for step in range(steps):
        fused_opt.zero_grad(set_to_none=True)
        _loss(task, fused_model, batches[step % len(batches)])
        grads = [p.grad.detach().clone() for p in fused_model.parameters()]
        for p, g in zip(plain_model.parameters(), grads):
            p.grad = g.clone()
        reference.lr = fused_opt.param_groups[0]["lr"]
        ref_params = [reference.step(i, p, g) for i, (p, g) in enumerate(zip(ref_params, grads))]
        for opt, sched in ((fused_opt, fused_sched), (plain_opt, plain_sched)):
            opt.step()
            sched.step()

    def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12)).item()
                   for x, y in zip(a, b))

    fused_p = [p.detach() for p in fused_model.parameters()]
    plain_p = [p.detach() for p in plain_model.parameters()]
    return {"steps": steps, "lr": lr, "momentum": momentum, "parameters": sum(p.numel() for p in fused_p),
            "fused_vs_default": relative(fused_p, plain_p), "fused_vs_reference": relative(fused_p, ref_params),
            "default_vs_reference": relative(plain_p, ref_params)}


def run(out: Path) -> dict:
    result = {"traces": [trace(*s) for s in SETTINGS], "paths": paths()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "multirun" / "study" / "momentum.json")
    args = parser.parse_args()
    bernoulli.enable()  # as train.py: the same dropout masks, sooner
    result = run(args.out)
    for t in result["traces"]:
        last = t["steps"][-1]
        print(f"lr {t['lr']} momentum {t['momentum']} warm-up {t['warmup_fraction']}: loss {last['loss']:.3f} at "
              f"step {last['step']}, update/lr " + ", ".join(f"{k} {v:.3f}" for k, v in last["update_rms_over_lr"].items()))
    print(json.dumps(result["paths"]))


if __name__ == "__main__":
    main()
