"""torchrun DDP: 2 CPU processes (gloo) give the losses of 1 process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

COMMON = ["model=transformer_tiny", "model.dropout=0.0", "logger=none", "trainer.progress=false",
          "trainer.polyak=false", "data.num_train=300", "data.num_valid=8", "data.num_test=8",
          "data.max_tokens=512", "trainer.eval_max_len=8", "trainer.log_interval=1", "trainer.max_steps=4",
          "trainer.eval_interval=100", "schedule.warmup_steps=2"]


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    single, double = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMON, cache, "trainer.grad_accum=2",
                    f"hydra.run.dir={single}"], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *COMMON, cache, "trainer.grad_accum=1", f"hydra.run.dir={double}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("process(es)") == 1  # rank 0 alone prints and logs
    one, two = _losses(single), _losses(double)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    summary = json.loads((double / "summary.json").read_text())
    assert summary["step"] == 4


def test_slurm_tasks_become_torchrun_ranks(monkeypatch):
    """hydra/launcher=slurm with tasks_per_node > 1 (or srun) runs one task per rank without torchrun."""
    sys.path.insert(0, str(ROOT))
    import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(key, "")  # recorded, so what the function exports is removed after the test
        monkeypatch.delenv(key)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "2"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    train.slurm_to_torchrun_environment()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0
    before = dict(os.environ)
    train.slurm_to_torchrun_environment()  # torchrun's variables, once set, are left alone
    assert dict(os.environ) == before
