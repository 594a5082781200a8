"""Train a translation Transformer (or a language model) with SM3 or a baseline optimizer on one config.

    python train.py optim=sm3 model=transformer          # the built-in data, offline
    python train.py model=transformer_lm_tiny data=builtin_lm   # language modelling, perplexity
    python train.py -m optim.lr=0.2,0.1,0.05 logger=none  # a sweep of SM3's lr, one directory per job

Re-running the same command resumes from `<run dir>/checkpoints/last.pt` (or, if that is corrupt,
the newest readable `step-NNNNNN.pt`); FSDP runs (`torchrun ... train.py trainer.parallel=fsdp`) from
the newest complete sharded `step-NNNNNN/` directory (see trainer/checkpoint/). `trainer.eval_only=true`
evaluates the newest checkpoint instead of training; `trainer.init_from=PATH` starts a new run from trained weights.

Exit status: 0 done; 2 bad input (config, data files, unusable checkpoint), as one `error: ...` line;
1 training diverged (trainer.max_bad_steps consecutive NaN/inf steps) or a multirun job failed;
143 after SIGTERM / 130 after SIGINT (or trainer.requeue_exit_code): the current step finished and a
checkpoint was written, so a scheduler may requeue the job, which then resumes. A second signal exits at once.

The parts live in `trainer/` (see its __init__); this file builds a run from them and runs the loop.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from data import DataError
from sm3 import optimizer_state_bytes
from trainer import bernoulli, config
from trainer.checkpoint import Checkpointer, CheckpointError, has_checkpoint
from trainer.checkpoint.safe_load import MODEL_SHAPE_KEYS, check_model_config
from trainer.distributed import (all_reduce, init_distributed, is_dtensor, is_main_process, pick_device, shard_model,
                                 slurm_to_torchrun_environment)
from trainer.errors import ConfigError, Preempted, TrainingDiverged
from trainer.files import RunDirLock, StorageError, os_error_in, remove_new_run_dir, storage_error, write_text
from trainer.machine import cpu_description
from trainer.optim import build_optimizer
from trainer.preemption import Preemption
from trainer.runlog import RunLog
from trainer.schedule import build_scheduler
from trainer.state import TrainState
from trainer.tasks import Task, build_task, task_type
from trainer.trained import loaded_line, read_trained, weights

config.register()
FAILED_JOBS: list[str] = []  # multirun jobs that raised, reported by cli() after the sweep


@dataclass
class Run:
    """Everything one job holds; built by ``set_up``, driven by ``train``."""

    cfg: Any
    task: Task
    model: torch.nn.Module
    net: torch.nn.Module  # what the loop calls: ``model``, or its DDP wrapper
    averaged: AveragedModel | None  # Polyak (EMA) average of the parameters, for evaluation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    rank: int
    world_size: int
    fsdp: bool
    autocast: Callable
    checkpointer: Checkpointer
    log: RunLog
    state: TrainState

    @property
    def is_main(self) -> bool:  # logs, checkpoints (DDP), evaluates (DDP) and talks to W&B
        return self.rank == 0


@dataclass
class StepResult:
    loss: float  # mean over the ranks of the per-token training loss
    grad_norm: float
    finite: bool  # False: the update was skipped
    tokens: int  # target tokens of the step, all ranks together
    signalled: bool = False  # some rank was asked to stop (SIGTERM/SIGINT)
    time_up: bool = False  # some rank's trainer.max_minutes ran out


def fast_bf16(device: torch.device) -> bool:
    """Whether ``auto`` turns bf16 autocast on: a CUDA device that supports it, or a CPU with bf16 instructions
    (AMX tiles or AVX-512 BF16; torch's own checks). On an AMD EPYC with AVX-512 BF16 and no AMX it took the
    base model's step to 0.39-0.60x and the tiny one's to 0.82x of float32's (docs/profile_cpu.md, README); without
    them bf16 is emulated and slower, so float32 stays."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # private checks, absent from some torch builds
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return device.type == "cpu" and any(check is not None and bool(check()) for check in checks)


def autocast_context(precision: str, device: torch.device):
    """``trainer.precision``: a context for forward passes. bf16 autocasts the matmuls (parameters, gradients
    and optimizer state stay float32); auto picks it where ``fast_bf16``."""
    if precision == "bf16" or (precision == "auto" and fast_bf16(device)):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def precision_name(autocast) -> str:
    """What an ``autocast_context`` runs in, as the start line and summary.json name it."""
    return "float32" if autocast is contextlib.nullcontext else "bf16 autocast"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def init_from_checkpoint(cfg, model: torch.nn.Module) -> None:
    """``trainer.init_from``: the model starts from a trained run's last-iterate weights (before the Polyak average
    is made from it); the optimizer, schedule and step start afresh. Read safely, as training resumes."""
    path, state = read_trained(Path(cfg.trainer.init_from),
                               report=print if is_main_process() else lambda line: None)
    current = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    check_model_config(state["model_config"], path, current, keys=MODEL_SHAPE_KEYS,
                       advice="trainer.init_from needs a model of the same shape")
    try:
        model.load_state_dict(weights(state, averaged=False)[0])
    except RuntimeError as error:  # the same shape, another vocabulary (the data's tokenizer)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]  # the second names a tensor
        raise CheckpointError(f"trainer.init_from: checkpoint {path} does not fit this model "
                              f"({' '.join(lines[:2])})") from error
    if is_main_process():
        print(f"trainer.init_from: {loaded_line(path, state['progress']['step'], 'last-iterate parameters')}")


def set_up(cfg, run_dir: Path) -> Run:
    """Process group, data and model, optimizer and schedule, the resumed state and the run's log.
    ``trainer.eval_only``: the run's checkpoint is required, and nothing of the run's is written."""
    trainer = cfg.trainer
    torch.manual_seed(trainer.seed)  # the same on every rank: identical initial replicas
    torch.set_flush_denormal(trainer.flush_denormal)  # no effect where the CPU cannot (returns False)
    slurm_to_torchrun_environment()
    device = pick_device(trainer.device)
    if device.type == "cpu":  # dropout masks: torch's own draws, ~10x faster (trainer/bernoulli.py)
        bernoulli.enable()
    fsdp = trainer.parallel == config.Parallel.fsdp
    rank, world_size = init_distributed(device, fsdp)
    task = build_task(cfg, trainer.seed)
    model = task.build_model().to(device)
    loads = trainer.resume == config.Resume.auto or trainer.eval_only  # the run's own checkpoint, if any
    if trainer.init_from is not None and not (loads and has_checkpoint(run_dir / "checkpoints")):
        init_from_checkpoint(cfg, model)  # a run's own checkpoint wins: loaded below, as every resume
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(trainer.polyak_decay)) if trainer.polyak else None
    if fsdp:  # the averaged copy is sharded alike, so its updates go shard to shard
        for module in [model] + ([averaged.module] if averaged is not None else []):
            shard_model(module, device, task.fsdp_blocks(module), task.fsdp_forward_methods)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.schedule, optimizer, trainer.max_steps)
    # DDP all-reduces gradients in backward (skipped on accumulation micro-steps, see no_sync); FSDP
    # reduce-scatters them (skipped alike, see set_requires_gradient_sync) and is `model` itself.
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) \
        if world_size > 1 and not fsdp else model
    if trainer.compile:  # checkpoints and evaluation use `model` itself: no compiled-module names in them
        net = torch.compile(net)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg, model, optimizer, scheduler, averaged, sharded=fsdp,
                                is_main=is_main_process(), keep=trainer.keep_checkpoints,
                                interval=trainer.checkpoint_interval, minutes=trainer.checkpoint_minutes)
    state = TrainState()
    found = checkpointer.load() if loads else None
    if found is not None:
        state = TrainState.from_state_dict(found[1])
        if is_main_process() and trainer.eval_only:
            parameters = "last-iterate and averaged parameters" if averaged is not None else "last-iterate parameters"
            print(f"trainer.eval_only: {loaded_line(found[0], state.step, parameters)}")
        elif is_main_process():
            print(f"Resuming from {found[0]} at step {state.step}" + (
                f" (its own checkpoint: trainer.init_from={trainer.init_from} is not used)" if trainer.init_from else ""))
    elif trainer.eval_only:
        raise CheckpointError(f"trainer.eval_only: no checkpoint in {run_dir / 'checkpoints'} to evaluate (give the "
                              "overrides the run was trained with, or its hydra.run.dir)")
    hydra_cfg = HydraConfig.get()
    log = RunLog(cfg, run_dir, is_main=is_main_process(), name=hydra_cfg.job.override_dirname or "defaults",
                 group=Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None)
    if not trainer.eval_only:  # evaluating leaves the run's config, metrics and W&B run as they are
        log.start(state)
    autocast = autocast_context(trainer.precision.value, device)
    if is_main_process():
        precision = precision_name(autocast)
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.optim.name.value} "
              f"lr {cfg.optim.lr:g}, "
              f"device {device} ({precision}{'' if device.type == 'cuda' else '; ' + cpu_description()}), "
              f"{world_size} process(es), run dir {run_dir}")
    return Run(cfg, task, model, net, averaged, optimizer, scheduler, device, rank, world_size, fsdp,
               autocast, checkpointer, log, state)


class TrainBatches:
    """The next training batch of this rank, from the position in ``state`` (epoch, batch_index)."""

    def __init__(self, run: Run):
        self.run, self.epoch, self.batches = run, None, None

    def next(self):
        state = self.run.state
        if self.epoch != state.epoch:
            self.epoch, self.batches = state.epoch, self.run.task.train_batches(
                state.epoch, self.run.rank, self.run.world_size)
        if state.batch_index >= len(self.batches):
            state.epoch, state.batch_index = state.epoch + 1, 0
            return self.next()
        state.batch_index += 1
        return self.batches[state.batch_index - 1].to(self.run.device)


def train_step(run: Run, batches: TrainBatches, stop: tuple[bool, bool] = (False, False)) -> StepResult:
    """Forward and backward over ``grad_accum`` micro-batches, the gradient norm (clipped if asked), and
    the update, unless the loss or the gradients are not finite on some rank: then nothing changes.
    ``stop``: this rank's (signalled, out of time), agreed in the same all-reduce as the loss."""
    trainer, model = run.cfg.trainer, run.model
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = 0.0, 0
    for micro in range(trainer.grad_accum):
        batch = batches.next()
        last_micro = micro == trainer.grad_accum - 1
        if run.fsdp:
            model.set_requires_gradient_sync(last_micro)
        ddp_skips_sync = run.world_size > 1 and not run.fsdp and not last_micro
        with run.autocast(), (run.net.no_sync() if ddp_skips_sync else contextlib.nullcontext()):
            loss = run.task.train_loss(run.net, batch)
            if run.state.step + 1 in trainer.debug_nan_steps:
                loss = loss * float("nan")
            (loss / trainer.grad_accum).backward()
        loss_sum += loss.item() / trainer.grad_accum
        tokens += batch.num_tokens
    signalled, time_up = stop
    if run.world_size > 1:  # every rank must agree on the loss (hence on skipping) and on stopping: one collective
        loss_sum, tokens, signalled, time_up = all_reduce([loss_sum, tokens, float(signalled), float(time_up)])
        loss_sum, tokens, signalled, time_up = loss_sum / run.world_size, int(tokens), signalled > 0, time_up > 0
    if trainer.clip_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.clip_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if is_dtensor(grad_norm):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    finite = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
        run.scheduler.step()
        if run.averaged is not None:
            run.averaged.update_parameters(model)
    else:  # skip the update: parameters, optimizer and schedule stay as they were
        run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, float(grad_norm), finite, tokens, signalled, time_up)


def evaluate(run: Run, split: str) -> dict:
    """``<split>_loss``, ``_ppl`` (and ``_bleu``, ``_example``) of the model, and ``..._averaged`` of the
    Polyak average. FSDP: every rank evaluates (each forward all-gathers the parameters)."""
    results = {f"{split}_{k}": v for k, v in run.task.evaluate(run.model, split, run.device, run.autocast).items()}
    if run.averaged is not None:
        averaged = run.task.evaluate(run.averaged.module, split, run.device, run.autocast)
        results.update({f"{split}_{k}_averaged": v for k, v in averaged.items()})
    if run.fsdp:  # an FSDP root stays gathered after a forward without backward
        for module in [run.model] + ([run.averaged.module] if run.averaged is not None else []):
            module.reshard()
    return results


def numbers(results: dict) -> dict:
    return {k: v for k, v in results.items() if "example" not in k}


def stop_requests(run: Run, preemption: Preemption, started: float) -> tuple[bool, bool]:
    """This rank's (signalled, out of time); ``train_step`` makes every rank agree, so that all stop at one step."""
    max_minutes = run.cfg.trainer.max_minutes
    return preemption.requested, max_minutes is not None and time.time() - started > 60 * max_minutes


def check_divergence(run: Run, result: StepResult, bad_in_a_row: int, bar) -> None:
    state, limit = run.state, run.cfg.trainer.max_bad_steps
    bar.write(f"step {state.step}: non-finite loss {result.loss} or gradient norm {result.grad_norm}; update "
              f"skipped ({bad_in_a_row} in a row, {state.skipped_steps} in all)")
    run.log.log({"step": state.step, "skipped_steps": state.skipped_steps})
    if bad_in_a_row >= limit:
        saved = run.checkpointer.saved_step
        raise TrainingDiverged(
            f"{bad_in_a_row} consecutive steps with non-finite loss or gradients (trainer.max_bad_steps={limit}) "
            f"up to step {state.step}; " + (f"the last checkpoint ({saved}) is from before them" if saved >= 0 else
                                            "no checkpoint was written yet") +
            ". Lower optim.lr, set trainer.clip_norm, or check the data")


PACE_STEPS = 10  # steps timed (after the first) before the run says what its budget buys


def pace_report(cfg, step: int, seconds_per_step: float, started: float) -> str:
    """What the measured step time means for this run: how long its steps take, or how many fit its budget."""
    trainer, left = cfg.trainer, cfg.trainer.max_steps - step
    line = f"step {step}: {seconds_per_step:.3g} s a step"
    if trainer.max_minutes is None:
        return f"{line}: the remaining {left} steps take ~{left * seconds_per_step / 60:.1f} min"
    fit = step + int(max(0.0, 60 * trainer.max_minutes - (time.time() - started)) / seconds_per_step)
    if fit >= trainer.max_steps:
        return f"{line}: all trainer.max_steps={trainer.max_steps} fit in trainer.max_minutes={trainer.max_minutes}"
    return (f"{line}: only ~{fit} of trainer.max_steps={trainer.max_steps} fit in trainer.max_minutes="
            f"{trainer.max_minutes}; the run stops there and evaluates (trainer.max_minutes=null trains them all; "
            "a smaller model, such as model=transformer_tiny on a CPU, fits the budget)")


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))  # 0:09:48


def progress_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_second: float,
                  elapsed: float, seconds_per_step: float) -> str:
    """The bar's numbers as one line, for logs: a bar redrawn in a file is unreadable, and none looks frozen."""
    return (f"step {step}/{max_steps} | loss {loss:.3f} | lr {lr:.3g} | {tokens_per_second:,.0f} tok/s | "
            f"elapsed {clock(elapsed)} | eta {clock((max_steps - step) * seconds_per_step)}")


def train_loop(run: Run, preemption: Preemption, started: float) -> None:
    """Steps until trainer.max_steps (or max_minutes, or a signal)."""
    trainer, state = run.cfg.trainer, run.state
    batches, bad_in_a_row, first_step, paced = TrainBatches(run), 0, state.step, []
    window_tokens, window_seconds, resumed_seconds = 0, 0.0, state.train_seconds
    # A bar on a terminal (trainer.progress); elsewhere, or with progress off, a line per trainer.log_interval.
    show_bar = trainer.progress and sys.stderr.isatty()
    with tqdm(total=trainer.max_steps, initial=state.step, dynamic_ncols=True,
              disable=not (run.is_main and show_bar)) as bar:
        while state.step < trainer.max_steps:
            step_start = time.time()
            result = train_step(run, batches, stop_requests(run, preemption, started))
            signalled, time_up = result.signalled, result.time_up
            if signalled:
                preemption.request()  # another rank's signal: stop here too
            state.step += 1
            state.tokens += result.tokens
            bad_in_a_row = 0 if result.finite else bad_in_a_row + 1
            state.skipped_steps += not result.finite
            seconds = time.time() - step_start
            state.train_seconds += seconds
            window_tokens, window_seconds = window_tokens + result.tokens, window_seconds + seconds
            bar.update(1)
            if first_step + 1 < state.step <= first_step + 1 + PACE_STEPS:  # the first pays one-time costs
                paced.append(seconds)
                if run.is_main and len(paced) == PACE_STEPS:  # the median: a new batch shape's slow step is no pace
                    bar.write(pace_report(run.cfg, state.step, statistics.median(paced), started))
            if not result.finite:
                check_divergence(run, result, bad_in_a_row, bar)
            elif state.step % trainer.log_interval == 0 or state.step == trainer.max_steps:
                tokens_per_second = window_tokens / max(window_seconds, 1e-9)  # steps only, all ranks
                window_tokens, window_seconds = 0, 0.0
                lr = run.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.3g}", tok_s=f"{tokens_per_second:.0f}")
                if run.is_main and not show_bar:
                    seconds_per_step = (state.train_seconds - resumed_seconds) / (state.step - first_step)
                    print(progress_line(state.step, trainer.max_steps, result.loss, lr, tokens_per_second,
                                        time.time() - started, seconds_per_step), flush=True)
                run.log.log({"step": state.step, "loss": result.loss, "lr": lr,
                             "tokens_per_second": tokens_per_second, "epoch": state.epoch,
                             "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds})
            if (run.is_main or run.fsdp) and state.step % trainer.eval_interval == 0 and state.step < trainer.max_steps:
                results = numbers(evaluate(run, "valid"))
                if trainer.eval_test:
                    results.update(numbers(evaluate(run, "test")))
                run.log.log({"step": state.step, "train_seconds": state.train_seconds, **results})
                if run.is_main:
                    bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
            if signalled:
                run.checkpointer.save(state.state_dict(), force=True)
                raise preemption.stopped(state.step, run.checkpointer.latest(state.step))
            run.checkpointer.save(state.state_dict())  # when due (trainer.checkpoint_interval / _minutes)
            if time_up:
                print(f"Stopping at step {state.step}: trainer.max_minutes={trainer.max_minutes} reached")
                break


def finish(run: Run, started: float) -> float:
    """Save, evaluate on valid and test, write summary.json; returns the value a sweeper maximises."""
    run.checkpointer.save(run.state.state_dict(), force=True)
    if not (run.is_main or run.fsdp):
        return float("nan")
    results = {**evaluate(run, "valid"), **evaluate(run, "test")}
    if not run.is_main:
        return float("nan")
    examples = {k: v for k, v in results.items() if "example" in k}
    state, task = run.state, run.task
    run.log.log({"step": state.step, "train_seconds": state.train_seconds, **numbers(results)})
    summary = {
        "step": state.step,
        **numbers(results),
        "tokens": state.tokens,
        "skipped_steps": state.skipped_steps,
        "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else None,
        "train_seconds": state.train_seconds,  # in steps, every session of the run; wall_seconds: this session
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "vocab_size": task.tokenizer.vocab_size,
        "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
        "peak_memory_bytes": peak_memory_bytes(run.device),
        "wall_seconds": time.time() - started,
        "device": str(run.device),
        "precision": precision_name(run.autocast),
        "cpu": cpu_description(),  # what the seconds above were measured on
        # dropout masks from trainer/bernoulli.py's kernel (the same masks as torch's, sooner); runs before it,
        # which lack the key, also computed a log-likelihood they threw away (scripts/bench_study_step.py)
        "dropout_kernel": bernoulli.enabled(),
        **({"examples": examples} if examples else {}),  # a decoded sentence per split (translation)
    }
    path = run.log.write_summary(summary)
    print(f"{task.report(summary)}; summary in {path}")
    return task.selection_value(summary)


def evaluate_checkpoint(run: Run) -> float:
    """``trainer.eval_only``: the loaded checkpoint's metrics on ``trainer.eval_split``, as summary.json has them,
    printed and written to ``eval-<split>.json`` beside it; returns the sweepers' value when valid is evaluated."""
    split = run.cfg.trainer.eval_split.value
    splits = ("valid", "test") if split == "both" else (split,)
    if not (run.is_main or run.fsdp):
        return float("nan")
    results = {s: evaluate(run, s) for s in splits}
    if not run.is_main:
        return float("nan")
    for s, result in results.items():
        examples = {k: v for k, v in result.items() if "example" in k}
        path = run.log.run_dir / f"eval-{s}.json"
        write_text(path, json.dumps({"step": run.state.step, **numbers(result),
                                     **({"examples": examples} if examples else {})}, indent=2) + "\n")
        print(f"step {run.state.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers(result).items()) +
              f"; in {path}")
    everything = {k: v for result in results.values() for k, v in result.items()}
    return run.task.selection_value(everything) if "valid" in results else float("nan")


def train(cfg: DictConfig, run_dir: Path) -> float:
    started = time.time()
    run = None
    try:
        run = set_up(cfg, run_dir)
        if cfg.trainer.eval_only:
            return evaluate_checkpoint(run)
        with Preemption(cfg.trainer.requeue_exit_code) as preemption:
            run.model.train()
            train_loop(run, preemption, started)
            return finish(run, started)
    finally:
        if run is not None:
            run.log.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def finished(cfg, run_dir: Path) -> float | None:
    """A run that already reached trainer.max_steps (its summary.json says so) is not redone: its result is
    printed and returned, and nothing is written (trainer.resume=never trains it again)."""
    path = run_dir / "summary.json"
    if cfg.trainer.resume != config.Resume.auto or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        if summary["step"] < cfg.trainer.max_steps:  # stopped by trainer.max_minutes: go on
            return None
        task = task_type(cfg)
        print(f"Already finished: {task.report(summary)}; summary in {path} (trainer.resume=never to redo it)")
        return task.selection_value(summary)
    except (ValueError, KeyError, TypeError):  # unreadable or from another kind of run: train
        return None


def record_failure(run_dir: Path, error: BaseException) -> float:
    """A multirun job that failed: marked with failed.json, reported after the sweep, which goes on."""
    message = f"{type(error).__name__}: {error}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "failed.json").write_text(json.dumps({"error": message}) + "\n")
    print(f"error: job {run_dir.name} failed ({message}); continuing with the other jobs", file=sys.stderr)
    FAILED_JOBS.append(run_dir.name)
    return float("nan")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One job. Bad input ends it with one `error:` line (exit 2; 1 if training diverged); in a multirun a failing
    job is recorded instead and the sweep goes on, but a signal stops the whole sweep (after a checkpoint)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    lock = RunDirLock(run_dir) if is_main_process() else contextlib.nullcontext()
    try:
        with lock:
            config.validate(cfg)
            if cfg.trainer.eval_only:  # a finished run too: train() evaluates its checkpoint instead of training
                return train(cfg, run_dir)
            (run_dir / "failed.json").unlink(missing_ok=True)
            result = finished(cfg, run_dir)
            return result if result is not None else train(cfg, run_dir)
    except Preempted as stop:  # raised from inside Hydra's job runner, so no later job starts
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except (DataError, CheckpointError, ConfigError, StorageError, TrainingDiverged) as error:
        if multirun:
            return record_failure(run_dir, error)
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, TrainingDiverged):
            sys.exit(1)
        if not isinstance(lock, contextlib.nullcontext):  # rank 0, the lock released
            remove_new_run_dir(run_dir, HydraConfig.get().job.name)
        sys.exit(2)
    except Exception as error:
        if multirun:
            return record_failure(run_dir, error)
        raise


def _config_error_line(error: BaseException) -> str:
    messages, cause = [], error
    while cause is not None:  # Hydra wraps the OmegaConf error that names the key
        messages.append(" ".join(str(cause).split("Config search path")[0].split()))
        cause = cause.__cause__
    line = " | ".join(dict.fromkeys(m for m in messages if m))
    return re.sub(r"\s*\b\w+_schema\b", "", line)  # the typed schemas are not options to choose


def cli() -> None:
    """Run `main`, turning a bad config (misspelt key, wrong type, unknown option) or an unwritable run directory
    into one `error:` line and exit code 2."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let config errors reach us instead of Hydra's own report
    try:
        main()
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as error:
        print(f"error: {_config_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:  # Hydra creating the run directory or its log file
        os_error = os_error_in(error)
        if os_error is None:
            raise
        print(f"error: {storage_error(Path(os_error.filename or '.'), os_error)}", file=sys.stderr)
        sys.exit(2)
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} multirun job(s) failed (see failed.json in each): {', '.join(FAILED_JOBS)}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
