"""Language modelling through the real command line: perplexity, exact resume, data/model mismatch."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_LM = ["model=transformer_lm_tiny", "data=builtin_lm", "logger=none", "trainer.progress=false",
           "data.num_train=200", "data.num_valid=10", "data.num_test=10", "data.seq_len=32", "data.max_tokens=256",
           "trainer.eval_interval=3", "trainer.log_interval=1", "schedule.warmup_steps=2"]


def _train(args, cwd, check=True):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lm-cache"))


def test_lm_end_to_end_perplexity_and_exact_resume(tmp_path, cache_dir):
    common = TINY_LM + [f"data.cache_dir={cache_dir}"]
    straight = tmp_path / "straight"
    result = _train(common + ["trainer.max_steps=6", f"hydra.run.dir={straight}"], tmp_path)
    assert "test perplexity" in result.stdout
    summary = json.loads((straight / "summary.json").read_text())
    for split in ("valid", "test"):
        for suffix in ("", "_averaged"):
            ppl, loss = summary[f"{split}_ppl{suffix}"], summary[f"{split}_loss{suffix}"]
            assert ppl == pytest.approx(math.exp(loss)) and 1 < ppl < 2000  # vocabulary 1000: near uniform at most
    assert "test_bleu" not in summary and summary["step"] == 6
    # valid perplexity recorded during training (eval_interval 3), and it fell from the untrained model's
    evals = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "valid_ppl" in r]
    assert [r["step"] for r in evals] == [3, 6]

    resumed = tmp_path / "resumed"
    _train(common + ["trainer.max_steps=3", f"hydra.run.dir={resumed}"], tmp_path)
    second = _train(common + ["trainer.max_steps=6", f"hydra.run.dir={resumed}"], tmp_path)
    assert "at step 3" in second.stdout
    assert _losses(resumed) == _losses(straight)


def test_lm_learns_on_builtin_data(tmp_path, cache_dir):
    run = tmp_path / "run"
    _train(TINY_LM + [f"data.cache_dir={cache_dir}", "trainer.max_steps=40", "trainer.eval_interval=1000",
                      "optim=adam", "optim.lr=3e-3", "schedule=inverse_sqrt", f"hydra.run.dir={run}"], tmp_path)
    losses = _losses(run)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats per token


@pytest.mark.parametrize("args,needs", [(["model=transformer_lm_tiny", "data=builtin"], "language-modelling"),
                                        (["model=transformer_tiny", "data=builtin_lm"], "translation")])
def test_model_and_data_kinds_must_match(tmp_path, args, needs):
    result = _train(args + ["logger=none"], tmp_path, check=False)
    assert result.returncode == 2 and needs in result.stderr and "Traceback" not in result.stderr
