"""The training pipeline: configs, the real command line end to end (translation and language
modelling), resume, schedules, models."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.transformer import Transformer
from trainer.optim import build_optimizer
from trainer.schedule import build_scheduler, inverse_sqrt, quadratic_warmup

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
          for group in ("model", "optim", "schedule", "data", "logger", "trainer", "experiment")}


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes(group, option, compose):
    cfg = compose([f"{group}={option}"])
    OmegaConf.to_object(cfg)  # every value fits its schema
    assert cfg.trainer.max_steps > 0


def test_optimizers_build_from_every_optim_option(compose):
    for option in GROUPS["optim"]:
        cfg = compose([f"optim={option}"])
        opt = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(3, 2))])
        assert opt.param_groups[0]["lr"] == cfg.optim.lr


def test_sm3_momentum_dtype_from_config(compose):
    cfg = compose(["optim=sm3", "optim.momentum_dtype=bfloat16"])
    param = torch.nn.Parameter(torch.ones(4, 3))
    opt = build_optimizer(cfg.optim, [param])
    param.grad = torch.ones(4, 3)
    opt.step()
    assert opt.state[param]["momentum_buffer"].dtype == torch.bfloat16
    with pytest.raises(Exception, match="momentum_dtype"):
        compose(["optim.momentum_dtype=int8"])


def test_schedule_shapes(compose):
    total, warmup = 1000, 50
    # the argument is LambdaLR's count of steps taken: step t = argument + 1
    assert quadratic_warmup(0, warmup, total) == pytest.approx((1 / 50) ** 2)  # the first step learns
    assert quadratic_warmup(24, warmup, total) == pytest.approx(0.25)
    assert quadratic_warmup(49, warmup, total) == 1 == quadratic_warmup(800, warmup, total)
    assert quadratic_warmup(48, warmup, total) < 1
    assert quadratic_warmup(950, warmup, total, cooldown_steps=100) == pytest.approx(0.5)
    assert quadratic_warmup(999, warmup, total, cooldown_steps=100) == pytest.approx(0.01)  # the last step
    assert inverse_sqrt(0, warmup) == pytest.approx(1 / 50)
    assert inverse_sqrt(24, warmup) == pytest.approx(0.5)
    assert inverse_sqrt(49, warmup) == 1
    assert inverse_sqrt(199, warmup) == pytest.approx(0.5)
    cfg = compose(["schedule=quadratic_warmup_cooldown", "schedule.warmup_fraction=0.05", "trainer.max_steps=100"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(cfg.schedule, opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    # warm-up over 5 steps: 2 * (1/5)^2 at the first, the full lr from the fifth; cool-down over the last 10
    assert lrs[0] == pytest.approx(2.0 / 25) and lrs[3] < 2.0 and lrs[4] == 2.0 == lrs[50]
    assert lrs[95] == pytest.approx(1.0) and lrs[-1] > 0


@pytest.mark.parametrize("pre_norm", [True, False])
def test_model_loss_and_decoding_shapes(pre_norm):
    torch.manual_seed(0)
    model = Transformer(50, 16, 32, 2, 1, 1, dropout=0.0, pre_norm=pre_norm).eval()
    src = torch.randint(4, 50, (3, 7))
    src[0, 5:] = 0  # padding
    tgt = torch.randint(4, 50, (3, 5))
    assert model(src, tgt).shape == (3, 5, 50)
    smoothed, nll = model.loss(src, tgt, tgt, label_smoothing=0.1), model.loss(src, tgt, tgt)
    assert smoothed.item() > nll.item() > 0  # smoothing puts weight on the classes the model ranks low
    greedy = model.generate(src, bos_id=2, eos_id=3, max_len=6)
    beam = model.generate(src, bos_id=2, eos_id=3, max_len=6, beam_size=3)
    assert len(greedy) == len(beam) == 3 and all(len(h) <= 6 for h in greedy + beam)
    # beam search with one beam is greedy search
    assert model._beam_search(*model.encode(src), 2, 3, 6, 1, 1.0) == greedy


# --- the real command line ----------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_run_directory_and_exact_resume(tmp_path, tiny, train_cli, metrics):
    common = tiny + ["trainer.eval_interval=4"]
    straight = tmp_path / "straight"
    train_cli(common + ["trainer.max_steps=6", f"hydra.run.dir={straight}"], tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (straight / name).exists(), name
    summary = json.loads((straight / "summary.json").read_text())
    for key in ("step", "valid_loss", "valid_bleu", "valid_bleu_averaged", "test_bleu", "test_bleu_averaged",
                "tokens_per_second", "optimizer_state_bytes", "peak_memory_bytes", "wall_seconds",
                "train_seconds", "vocab_size", "parameters"):
        assert key in summary, key
    assert summary["step"] == 6 and math.isfinite(summary["valid_loss"])
    assert summary["dropout_kernel"] is True  # a CPU run draws its dropout masks with trainer/bernoulli.py's kernel
    records = metrics(straight)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr"} <= r.keys() for r in records if "loss" in r)

    # scripts/translate.py on the run directory: one line out per line in, BLEU against references
    sources, references = tmp_path / "src.txt", tmp_path / "ref.txt"
    sources.write_text("twenty-one\nthe third of may\n")
    references.write_text("vingt et un\nle trois mai\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "translate.py"), str(straight),
                             "--input", str(sources), "--references", str(references), "--beam-size", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2 and "BLEU" in result.stderr
    # a truncated last.pt: read as training resumes, the newest readable step file instead
    last = straight / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()  # a hard link to the newest step file: replace it, do not truncate both
    last.write_bytes(data[: len(data) // 2])
    translate = [sys.executable, str(ROOT / "scripts" / "translate.py"), str(straight), "--input", str(sources)]
    fallback = subprocess.run(translate, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert fallback.returncode == 0, fallback.stderr
    assert len(fallback.stdout.splitlines()) == 2
    assert "skipping" in fallback.stderr and "last.pt" in fallback.stderr
    for step_file in (straight / "checkpoints").glob("step-*.pt"):
        step_file.write_bytes(b"garbage")
    broken = subprocess.run(translate, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith("error: no readable checkpoint")

    resumed = tmp_path / "resumed"
    first = train_cli(common + ["trainer.max_steps=3", f"hydra.run.dir={resumed}"], tmp_path)
    assert "Resuming" not in first.stdout
    second = train_cli(common + ["trainer.max_steps=6", f"hydra.run.dir={resumed}"], tmp_path)
    assert "Resuming from" in second.stdout and "at step 3" in second.stdout
    assert metrics(resumed, "loss") == metrics(straight, "loss")  # bitwise: same floats in the JSON
    # the training time adds up over the resume (equal-wall-time plots read it from every record)
    seconds = [r["train_seconds"] for r in metrics(resumed) if "loss" in r]
    assert len(seconds) == 6 and seconds == sorted(seconds) and seconds[0] > 0
    assert json.loads((resumed / "summary.json").read_text())["train_seconds"] >= seconds[-1]


@pytest.mark.slow
def test_bad_config_gives_a_clear_error(tmp_path, train_cli):
    result = train_cli(["trainer.max_stesp=5"], tmp_path, check=False)
    assert result.returncode == 2 and "max_stesp" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")  # every error line, config ones too
    result = train_cli(["optim=adamw"], tmp_path, check=False)
    out = result.stderr + result.stdout
    assert result.returncode == 2 and "adamw" in out and "sm3" in out  # lists the valid choices
    assert "optim_schema" not in out  # and no internal names
    result = train_cli(["logger.mode=sometimes"], tmp_path, check=False)
    assert result.returncode != 0 and "online" in result.stderr + result.stdout


@pytest.mark.slow
def test_help_is_ours_and_names_every_option(tmp_path, train_cli):
    result = train_cli(["--help"], tmp_path)
    assert result.stdout.startswith("train.py: train a Transformer with SM3") and "== Examples ==" in result.stdout
    assert "powered by Hydra" not in result.stdout and "_schema" not in result.stdout  # the typed schemas are no choice
    listed = set(re.findall(r"[a-z0-9_]+", result.stdout.split("== Config groups")[1].split("== Config,")[0]))
    for group in ("model", "optim", "schedule", "data", "logger", "trainer", "hparams_search"):
        assert {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")} <= listed, group


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path, tiny, train_cli):
    sweep = tmp_path / "sweep"
    train_cli(["-m", "optim=sm3,adam", "trainer.max_steps=2", f"hydra.sweep.dir={sweep}", *tiny], tmp_path)
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2, list(sweep.iterdir())
    assert {json.loads(s.read_text())["step"] for s in summaries} == {2}


# --- language modelling through the same command line ---------------------------------------

@pytest.mark.slow
def test_lm_end_to_end_perplexity_and_exact_resume(tmp_path, tiny_lm, train_cli, metrics):
    common = tiny_lm
    straight = tmp_path / "straight"
    result = train_cli(common + ["trainer.max_steps=6", f"hydra.run.dir={straight}"], tmp_path)
    assert "test perplexity" in result.stdout
    summary = json.loads((straight / "summary.json").read_text())
    for split in ("valid", "test"):
        for suffix in ("", "_averaged"):
            ppl, loss = summary[f"{split}_ppl{suffix}"], summary[f"{split}_loss{suffix}"]
            assert ppl == pytest.approx(math.exp(loss)) and 1 < ppl < 2000  # vocabulary 1000: near uniform at most
    assert "test_bleu" not in summary and summary["step"] == 6
    # valid perplexity recorded during training (eval_interval 3), and it fell from the untrained model's
    evals = [r for r in metrics(straight) if "valid_ppl" in r]
    assert [r["step"] for r in evals] == [3, 6]

    resumed = tmp_path / "resumed"
    train_cli(common + ["trainer.max_steps=3", f"hydra.run.dir={resumed}"], tmp_path)
    second = train_cli(common + ["trainer.max_steps=6", f"hydra.run.dir={resumed}"], tmp_path)
    assert "at step 3" in second.stdout
    assert metrics(resumed, "loss") == metrics(straight, "loss")


@pytest.mark.slow
def test_lm_learns_on_builtin_data(tmp_path, tiny_lm, train_cli, metrics):
    run = tmp_path / "run"
    train_cli(tiny_lm + ["trainer.max_steps=40", "trainer.eval_interval=1000",
                      "optim=adam", "optim.lr=3e-3", "schedule=inverse_sqrt", f"hydra.run.dir={run}"], tmp_path)
    losses = metrics(run, "loss")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats per token


@pytest.mark.parametrize("args,needs", [(["model=transformer_lm_tiny", "data=builtin"], "language-modelling"),
                                        (["model=transformer_tiny", "data=builtin_lm"], "translation")])
@pytest.mark.slow
def test_model_and_data_kinds_must_match(tmp_path, args, needs, train_cli):
    result = train_cli(args + ["logger=none"], tmp_path, check=False)
    assert result.returncode == 2 and needs in result.stderr and "Traceback" not in result.stderr


def test_the_run_says_early_what_its_time_budget_buys(compose):
    import time

    from train import pace_report

    cfg = compose(["model=transformer", "trainer.max_steps=2000", "trainer.max_minutes=12"])
    slow = pace_report(cfg, 11, 1.4, started=time.time())  # the base model's step on a 2-core CPU
    assert "only ~52" in slow and "of trainer.max_steps=2000" in slow and "model=transformer_tiny" in slow
    assert "all trainer.max_steps=2000 fit" in pace_report(cfg, 11, 0.07, started=time.time())
    cfg.trainer.max_minutes = None
    assert "the remaining 1989 steps take ~2.3 min" in pace_report(cfg, 11, 0.07, started=time.time())


def test_progress_line_reads_like_fairseqs():
    from train import progress_line

    assert progress_line(40, 2000, 5.1234, 0.01234, 9812.4, 12.2, 0.3) == \
        "step 40/2000 | loss 5.123 | lr 0.0123 | 9,812 tok/s | elapsed 0:00:12 | eta 0:09:48"


@pytest.mark.slow
def test_a_run_logged_to_a_file_shows_its_progress(tmp_path, tiny, train_cli):
    # SLURM, nohup, `> log`: no terminal, so no bar; a line every trainer.log_interval steps instead.
    log = tmp_path / "log"
    args = [*tiny, "trainer.progress=true", "trainer.log_interval=2", "trainer.max_steps=4",
            "trainer.eval_interval=1000", f"hydra.run.dir={tmp_path / 'run'}"]
    with open(log, "w") as out:
        result = subprocess.run(train_cli.command(args), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                timeout=300)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    line = re.compile(r"step (\d+)/4 \| loss \d+\.\d{3} \| lr \S+ \| [\d,]+ tok/s \| elapsed \d+:\d\d:\d\d \| "
                      r"eta \d+:\d\d:\d\d")
    assert [m.group(1) for m in map(line.fullmatch, text.splitlines()) if m] == ["2", "4"], text
    assert "CUDA_HOME" not in text


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                       (False, False, torch.float32)])
def test_precision_auto_picks_bf16_on_cpus_with_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    import train

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    layer = torch.nn.Linear(8, 8)
    with train.autocast_context("auto", torch.device("cpu"))():
        assert layer(torch.randn(2, 8)).dtype == expected
    with train.autocast_context("fp32", torch.device("cpu"))():
        assert layer(torch.randn(2, 8)).dtype == torch.float32
    with train.autocast_context("bf16", torch.device("cpu"))():
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
