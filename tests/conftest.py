"""Fixtures shared by the training repository's tests: composed configs, one data cache per session,
the real command line (`train.py`, under torchrun too) and a run's metrics. The library's own tests
are in tests/sm3/."""

from __future__ import annotations

import os

# pytest-xdist (`-n auto` in pyproject.toml) runs one worker per core: each worker, and every train.py,
# torchrun or interpreter it launches, gets its share of the cores, not all of them (two workers with
# 2 OpenMP threads each on 2 cores slow each other down many times over).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import config

ROOT = Path(__file__).resolve().parents[1]
# The tiny translation run most command-line tests start from: a few seconds a step on 2 cores.
TINY = ["model=transformer_tiny", "logger=none", "trainer.progress=false", "data.num_train=300",
        "data.num_valid=8", "data.num_test=8", "data.max_tokens=1024", "trainer.log_interval=1",
        "trainer.eval_max_len=12", "schedule.warmup_steps=2", "trainer.precision=fp32"]  # same numbers on any CPU
TINY_LM = ["model=transformer_lm_tiny", "data=builtin_lm", "logger=none", "trainer.progress=false",
           "data.num_train=200", "data.num_valid=10", "data.num_test=10", "data.seq_len=32", "data.max_tokens=256",
           "trainer.eval_interval=3", "trainer.log_interval=1", "schedule.warmup_steps=2", "trainer.precision=fp32"]

config.register()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One data cache (corpus, tokenizer, LM streams) for the whole session."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def tiny(cache_dir) -> list[str]:
    """Overrides of a tiny translation run on a slice of the built-in data (seconds a step on 2 cores)."""
    return [*TINY, f"data.cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_lm(cache_dir) -> list[str]:
    """The same for language modelling."""
    return [*TINY_LM, f"data.cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def compose():
    """``compose(overrides, hydra_config=False)``: conf/config.yaml with overrides, as train.py sees it."""
    return config.compose


class TrainCLI:
    """``train.py`` as a user runs it, in a subprocess."""

    @staticmethod
    def torchrun(processes: int) -> list[str]:
        """A launcher: torchrun on this machine with ``processes`` ranks (gloo on CPU)."""
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]

    @staticmethod
    def command(args, launcher=None) -> list[str]:
        flags = [a for a in args if a.startswith("-")]  # e.g. -m, which must precede the overrides
        overrides = [a for a in args if not a.startswith("-")]
        return [*(launcher or [sys.executable]), str(ROOT / "train.py"), *flags, *overrides]

    def __call__(self, args, cwd, *, launcher=None, env=None, check=True, timeout=300):
        result = subprocess.run(self.command(args, launcher), cwd=cwd, capture_output=True, text=True,
                                timeout=timeout, env=env)
        if check:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result


@pytest.fixture(scope="session")
def train_cli() -> TrainCLI:
    return TrainCLI()


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def metrics():
    """``metrics(run_dir)``: every record of metrics.jsonl; ``metrics(run_dir, "loss")``: one key's values."""
    def metrics(run_dir, key=None):
        records = read_records(run_dir)
        return records if key is None else [r[key] for r in records if key in r]

    return metrics


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(result, code=2)``: the run failed with exit ``code`` and exactly one ``error:`` line."""
    def one_line_error(result, code=2):
        assert result.returncode == code, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        return errors[0]

    return one_line_error


@pytest.fixture(scope="session")
def wait_for():
    """``wait_for(predicate, process, timeout)``: poll until ``predicate()``, failing if ``process`` ends first."""
    def wait_for(predicate, process, timeout=240):
        deadline = time.time() + timeout
        while not predicate():
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "timed out"
            time.sleep(0.05)

    return wait_for
