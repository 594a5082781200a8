"""Train a translation Transformer (or a language model) with SM3 or a baseline optimizer on one config.

    python train.py optim=sm3 model=transformer          # the built-in data, offline
    python train.py model=transformer_lm_tiny data=builtin_lm   # language modelling, perplexity
    python train.py -m optim=sm3,adam optim.lr=0.1,0.05  # a sweep, one directory per job

Re-running the same command resumes from `<run dir>/checkpoints/last.pt` (or, if that is corrupt,
the newest readable `step-NNNNNN.pt`); FSDP runs (`torchrun ... train.py trainer.parallel=fsdp`) from
the newest complete sharded `step-NNNNNN/` directory (see checkpoint.py).

Exit status: 0 done; 2 bad input (config, data files, unusable checkpoint), as one `error: ...` line;
1 training diverged (trainer.max_bad_steps consecutive NaN/inf steps) or a multirun job failed;
143 after SIGTERM / 130 after SIGINT (or trainer.requeue_exit_code): the current step finished and a
checkpoint was written, so a scheduler may requeue the job, which then resumes. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import hydra
import sacrebleu
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import schema
from checkpoint import (CheckpointError, latest_checkpoint, load_sharded_checkpoint, restore_checkpoint,
                        save_checkpoint, save_sharded_checkpoint)
from data import DataError, load_lm_data, load_translation_data
from models import TransformerLM, build_model
from models.transformer import sequence_loss
from optimizers import build_optimizer
from schedules import build_scheduler
from sm3 import optimizer_state_bytes

schema.register()


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint is written. Carries the exit status for the scheduler."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(RuntimeError):
    pass


class ConfigError(ValueError):
    """A valid config that cannot run as launched (e.g. trainer.parallel=fsdp without torchrun)."""


FAILED_JOBS: list[str] = []  # multirun jobs that raised, reported by cli() after the sweep


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


def init_distributed(device: torch.device, fsdp: bool = False) -> tuple[int, int]:
    """(rank, world size): torchrun (or SLURM, see above) sets WORLD_SIZE; NCCL on CUDA, gloo on CPU.
    FSDP needs a process group even for a single torchrun process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise ConfigError("trainer.parallel=fsdp needs torchrun: torchrun --nproc_per_node=N train.py "
                          "trainer.parallel=fsdp ...")
    if (world_size > 1 or fsdp) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world_size) if dist.is_initialized() else (0, 1)


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each transformer block is a unit (all-gathered just before it runs, freed after),
    then the root (embedding, final norms). Parameters become DTensors sharded over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = model.blocks if isinstance(model, TransformerLM) else [*model.encoder, *model.decoder]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not isinstance(model, TransformerLM):
        register_fsdp_forward_method(model, "generate")  # decoding calls encode/decode, not forward


def autocast_context(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def evaluate(model, data, split: str, cfg, device, autocast) -> dict:
    """Teacher-forced loss/perplexity, and for translation the BLEU of decoded translations."""
    was_training = model.training
    model.eval()
    lm = isinstance(model, TransformerLM)  # language model: every target token of the split counted once
    nll_sum, tokens, hypotheses, references = 0.0, 0, [], []
    for batch in data.batches(split, shuffle=False):
        batch = batch.to(device)
        with autocast():
            _, nll = model.loss(batch.input, batch.target) if lm else model.loss(batch.src, batch.tgt_in, batch.tgt_out)
            if not lm:
                max_len = min(cfg.trainer.eval_max_len, int(1.5 * batch.src.shape[1]) + 10)
                ids = model.generate(batch.src, data.tokenizer.bos_id, data.tokenizer.eos_id, max_len,
                                     cfg.trainer.beam_size, cfg.trainer.length_penalty)
                hypotheses += [data.tokenizer.decode(h) for h in ids]
                references += [data.targets[split][i] for i in batch.indices]
        nll_sum += nll.item()
        tokens += batch.num_tokens
    model.train(was_training)
    loss = nll_sum / max(tokens, 1)
    results = {"loss": loss, "ppl": math.exp(min(loss, 50))}
    if not lm:
        results.update(bleu=sacrebleu.corpus_bleu(hypotheses, [references]).score, example=hypotheses[:1])
    return results


def init_wandb(cfg, run_dir: Path, run_id: str | None):
    """One W&B run per job (rank 0); offline with a notice when credentials or network are missing."""
    if cfg.logger.name == "none" or cfg.logger.mode == "disabled":
        return None
    import wandb

    mode = cfg.logger.mode.value
    netrc = Path.home() / ".netrc"
    has_key = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if mode == "online" and not has_key:
        print("W&B: no credentials (WANDB_API_KEY or `wandb login`); logging offline, sync later with `wandb sync`")
        mode = "offline"
    choices = HydraConfig.get().job.override_dirname or "defaults"
    group = Path(HydraConfig.get().sweep.dir).name if HydraConfig.get().mode.name == "MULTIRUN" else None
    kwargs = dict(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), id=run_id,
                  resume="allow", name=choices, group=group,
                  config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            return wandb.init(mode=attempt, settings=wandb.Settings(init_timeout=60), **kwargs)
        except Exception as error:  # network, auth or service failure: never lose the run
            print(f"W&B: {mode} init failed ({type(error).__name__}: {error}); " +
                  ("retrying offline" if attempt == "online" else "continuing without W&B"))
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One job. In a multirun a failing job is recorded (`failed.json` in its directory) and the sweep goes on."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "failed.json").unlink(missing_ok=True)
    if HydraConfig.get().mode.name != "MULTIRUN":
        return train(cfg, run_dir)
    try:
        return train(cfg, run_dir)
    except Exception as error:
        if isinstance(error, Preempted):
            raise  # the whole sweep is being stopped
        message = f"{type(error).__name__}: {error}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failed.json").write_text(json.dumps({"error": message}) + "\n")
        print(f"error: job {run_dir.name} failed ({message}); continuing with the other jobs", file=sys.stderr)
        FAILED_JOBS.append(run_dir.name)
        return float("nan")


def train(cfg: DictConfig, run_dir: Path) -> float:
    started = time.time()
    checkpoint_dir = run_dir / "checkpoints"
    trainer = cfg.trainer
    torch.manual_seed(trainer.seed)  # the same on every rank: identical initial replicas
    torch.set_flush_denormal(trainer.flush_denormal)  # no effect where the CPU cannot (returns False)
    slurm_to_torchrun_environment()
    device = pick_device(trainer.device)
    fsdp = trainer.parallel == schema.Parallel.fsdp
    rank, world_size = init_distributed(device, fsdp)
    is_main = rank == 0  # logs, checkpoints (DDP), evaluates (DDP) and talks to W&B
    autocast = autocast_context(trainer.precision.value, device)

    is_lm = cfg.model.name == schema.ModelName.transformer_lm
    if is_lm != ("seq_len" in cfg.data):
        raise DataError(
            f"model.name={cfg.model.name.value} needs " + ("a language-modelling data option (data=builtin_lm, "
            "wikitext103, lm1b or local_lm)" if is_lm else "a translation data option (data=builtin, "
            "wmt14_en_fr, wmt14_en_de or local)") + f", got data.name={cfg.data.name}")
    data = (load_lm_data if is_lm else load_translation_data)(cfg.data, seed=trainer.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size, data.tokenizer.pad_id).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(trainer.polyak_decay)) if trainer.polyak else None
    # FSDP: the averaged copy is sharded alike, so its updates go shard to shard
    fsdp_modules = [model] + ([averaged.module] if averaged is not None else []) if fsdp else []
    for module in fsdp_modules:
        shard_model(module, device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.schedule, optimizer, trainer.max_steps)
    # DDP all-reduces gradients in backward (skipped on accumulation micro-steps, see no_sync); FSDP
    # reduce-scatters them (skipped alike, see set_requires_gradient_sync) and is `model` itself.
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) \
        if world_size > 1 and not fsdp else model
    progress = {"step": 0, "epoch": 0, "batch_index": 0, "tokens": 0, "wandb_id": None}

    found = None
    if trainer.resume == "auto" and fsdp:
        found = load_sharded_checkpoint(checkpoint_dir, cfg, model, optimizer, scheduler, averaged,
                                        report=print if is_main else lambda line: None)
    elif trainer.resume == "auto":
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            found = found[0], restore_checkpoint(found[1], found[0], cfg, model, optimizer, scheduler, averaged)
    if found is not None:
        path, progress = found
        if is_main or not fsdp:
            print(f"Resuming from {path} at step {progress['step']}")
    progress.setdefault("skipped_steps", 0)
    metrics_path = run_dir / "metrics.jsonl"
    if not is_main:
        pass
    elif progress["step"] == 0:
        metrics_path.unlink(missing_ok=True)
    else:  # drop records written after the checkpoint we resume from
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= progress["step"]]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    if is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    run = init_wandb(cfg, run_dir, progress["wandb_id"]) if is_main else None
    progress["wandb_id"] = run.id if run is not None else progress["wandb_id"]
    if is_main:
        print(f"{parameters / 1e6:.2f}M parameters, {cfg.optim.name.value}, device {device}, "
              f"{world_size} process(es), run dir {run_dir}")

    def log(record: dict) -> None:
        if not is_main:
            return
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if run is not None:
            run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    saved = {"step": progress["step"] if found is not None else -1, "time": time.time()}

    def save() -> None:
        if fsdp and saved["step"] != progress["step"]:  # every rank writes its shards
            save_sharded_checkpoint(checkpoint_dir, cfg, model, optimizer, scheduler, averaged, progress,
                                    keep=trainer.keep_checkpoints)
        elif is_main and saved["step"] != progress["step"]:
            save_checkpoint(checkpoint_dir, cfg, model, optimizer, scheduler, averaged, progress,
                            keep=trainer.keep_checkpoints)
        saved.update(step=progress["step"], time=time.time())

    # SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, checkpoint, exit for requeue; a second one exits now.
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        if received:
            print(f"{signal.Signals(signum).name} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(trainer.requeue_exit_code if trainer.requeue_exit_code is not None else 128 + signum)
        received.append(signum)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def evaluate_both(split: str) -> dict:
        results = {f"{split}_{k}": v for k, v in evaluate(model, data, split, cfg, device, autocast).items()}
        if averaged is not None:
            avg = evaluate(averaged.module, data, split, cfg, device, autocast)
            results.update({f"{split}_{k}_averaged": v for k, v in avg.items()})
        for module in fsdp_modules:  # an FSDP root stays gathered after a forward without backward
            module.reshard()
        return results

    def train_batches():  # each rank takes every world_size-th batch of the epoch
        return data.batches("train", epoch=progress["epoch"], rank=rank, world_size=world_size)

    batches = train_batches()
    bar = tqdm(total=trainer.max_steps, initial=progress["step"],
               disable=not (is_main and trainer.progress and sys.stderr.isatty()),
               dynamic_ncols=True)
    train_seconds, window_tokens, window_start = 0.0, 0, time.time()
    bad_in_a_row = 0
    last_eval: dict = {}
    try:
        model.train()
        while progress["step"] < trainer.max_steps:
            step_start = time.time()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(trainer.grad_accum):
                if progress["batch_index"] >= len(batches):
                    progress["epoch"] += 1
                    progress["batch_index"] = 0
                    batches = train_batches()
                batch = batches[progress["batch_index"]].to(device)
                progress["batch_index"] += 1
                last_micro = micro == trainer.grad_accum - 1
                if fsdp:
                    model.set_requires_gradient_sync(last_micro)
                with autocast(), (contextlib.nullcontext() if net is model or last_micro else net.no_sync()):
                    logits, target = (net(batch.input), batch.target) if is_lm else \
                        (net(batch.src, batch.tgt_in), batch.tgt_out)
                    loss, _ = sequence_loss(logits, target, model.pad_id, cfg.model.label_smoothing)
                    loss = loss / batch.num_tokens
                    if progress["step"] + 1 in trainer.debug_nan_steps:
                        loss = loss * float("nan")
                    (loss / trainer.grad_accum).backward()
                loss_sum += loss.item() / trainer.grad_accum
                progress["tokens"] += batch.num_tokens
                window_tokens += batch.num_tokens
            time_up = trainer.max_minutes is not None and time.time() - started > 60 * trainer.max_minutes
            if world_size > 1:  # every rank must agree on the loss, a signal and the time budget
                flags = torch.tensor([loss_sum, float(bool(received)), float(time_up)], dtype=torch.float64)
                dist.all_reduce(flags)
                loss_sum, any_signal, time_up = flags[0].item() / world_size, flags[1].item() > 0, flags[2].item() > 0
                if any_signal and not received:
                    received.append(signal.SIGTERM)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if trainer.clip_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.clip_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
            good = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
            if good:
                optimizer.step()
                scheduler.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                bad_in_a_row = 0
            else:  # skip the update: parameters, optimizer and schedule stay as they were
                optimizer.zero_grad(set_to_none=True)
                progress["skipped_steps"] += 1
                bad_in_a_row += 1
            progress["step"] += 1
            step = progress["step"]
            train_seconds += time.time() - step_start
            bar.update(1)
            if not good:
                bar.write(f"step {step}: non-finite loss {loss_sum} or gradient norm {float(grad_norm)}; update skipped "
                          f"({bad_in_a_row} in a row, {progress['skipped_steps']} in all)")
                log({"step": step, "skipped_steps": progress["skipped_steps"]})
                if bad_in_a_row >= trainer.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_in_a_row} consecutive steps with non-finite loss or gradients (trainer.max_bad_steps="
                        f"{trainer.max_bad_steps}) up to step {step}; the last checkpoint ({saved['step']}) is from "
                        "before them. Lower optim.lr, set trainer.clip_norm, or check the data")
            elif step % trainer.log_interval == 0 or step == trainer.max_steps:
                tokens_per_second = window_tokens / max(time.time() - window_start, 1e-9)
                window_tokens, window_start = 0, time.time()
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.3g}", tok_s=f"{tokens_per_second:.0f}")
                log({"step": step, "loss": loss_sum, "lr": lr, "tokens_per_second": tokens_per_second,
                     "epoch": progress["epoch"], "skipped_steps": progress["skipped_steps"]})
            # FSDP: every rank evaluates (each forward all-gathers the parameters); rank 0 reports
            if (is_main or fsdp) and step % trainer.eval_interval == 0 and step < trainer.max_steps:
                last_eval = evaluate_both("valid")
                log({"step": step, **{k: v for k, v in last_eval.items() if "example" not in k}})
                if is_main:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in last_eval.items()
                                                            if "example" not in k))
            if received:
                save()
                name, code = signal.Signals(received[0]).name, trainer.requeue_exit_code
                code = 128 + received[0] if code is None else code
                latest = checkpoint_dir / (f"step-{step:06d}" if fsdp else "last.pt")
                raise Preempted(f"{name} at step {step}: checkpoint saved to {latest}; "
                                f"exiting with status {code} (requeue: the same command resumes)", code)
            if step % trainer.checkpoint_interval == 0 or (
                    trainer.checkpoint_minutes is not None and time.time() - saved["time"] > 60 * trainer.checkpoint_minutes):
                save()
            if time_up:
                print(f"Stopping at step {step}: trainer.max_minutes={trainer.max_minutes} reached")
                break
        bar.close()
        save()
        if not (is_main or fsdp):
            return float("nan")
        results = evaluate_both("valid")
        results.update(evaluate_both("test"))
        if not is_main:
            return float("nan")
        examples = {k: v for k, v in results.items() if "example" in k}
        results = {k: v for k, v in results.items() if "example" not in k}
        log({"step": progress["step"], **results})
        summary = {
            "step": progress["step"],
            **results,
            "tokens": progress["tokens"],
            "skipped_steps": progress["skipped_steps"],
            "tokens_per_second": progress["tokens"] / max(train_seconds, 1e-9) if train_seconds else None,
            "parameters": parameters,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "peak_memory_bytes": peak_memory_bytes(device),
            "wall_seconds": time.time() - started,
            "device": str(device),
            **({"examples": examples} if examples else {}),  # a decoded sentence per split (translation)
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if run is not None:
            run.summary.update({k: v for k, v in summary.items() if k != "examples"})
        metric = "ppl" if is_lm else "bleu"  # what the run is judged by
        name = "perplexity" if is_lm else "BLEU"
        print(f"test {name} {summary[f'test_{metric}']:.2f} (averaged "
              f"{summary.get(f'test_{metric}_averaged', float('nan')):.2f}), valid {name} "
              f"{summary[f'valid_{metric}']:.2f}; summary in {run_dir / 'summary.json'}")
        # For sweepers, higher is better: BLEU, or minus the perplexity
        best = summary.get(f"valid_{metric}_averaged", summary[f"valid_{metric}"])
        return -best if is_lm else best
    finally:
        bar.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if run is not None:
            run.finish()
        if dist.is_initialized():
            dist.destroy_process_group()


def cli() -> None:
    """Run `main`, turning a bad config (misspelt key, wrong type, unknown option) into one line and exit code 2."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let config errors reach us instead of Hydra's own report
    try:
        main()
    except Preempted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except (DataError, CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as error:
        messages, cause = [], error
        while cause is not None:  # Hydra wraps the OmegaConf error that names the key
            messages.append(" ".join(str(cause).split("Config search path")[0].split()))
            cause = cause.__cause__
        print("config error: " + " | ".join(dict.fromkeys(m for m in messages if m)), file=sys.stderr)
        sys.exit(2)
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} multirun job(s) failed (see failed.json in each): {', '.join(FAILED_JOBS)}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
