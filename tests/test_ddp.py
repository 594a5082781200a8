"""torchrun DDP: 2 CPU processes (gloo) give the losses of 1 process with the same global batch."""

import json
import os

import pytest
import torch.distributed as dist

from trainer.distributed import slurm_to_torchrun_environment

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

COMMON = ["model=transformer_tiny", "model.dropout=0.0", "logger=none", "trainer.progress=false",
          "trainer.precision=fp32",  # the same numbers on any CPU: auto picks bf16 on some
          "trainer.polyak=false", "data.num_train=300", "data.num_valid=8", "data.num_test=8",
          "data.max_tokens=512", "trainer.eval_max_len=8", "trainer.log_interval=1", "trainer.max_steps=4",
          "trainer.eval_interval=100", "schedule.warmup_steps=2"]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, cache_dir, train_cli, metrics):
    common, single, double = [*COMMON, f"data.cache_dir={cache_dir}"], tmp_path / "single", tmp_path / "ddp"
    train_cli([*common, "trainer.grad_accum=2", f"hydra.run.dir={single}"], tmp_path)
    result = train_cli([*common, "trainer.grad_accum=1", f"hydra.run.dir={double}"], tmp_path,
                       launcher=train_cli.torchrun(2))
    assert result.stdout.count("process(es)") == 1  # rank 0 alone prints and logs
    one, two = metrics(single, "loss"), metrics(double, "loss")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    summary = json.loads((double / "summary.json").read_text())
    assert summary["step"] == 4
    # tokens are counted over both ranks: as many as the one process with the same global batch saw
    assert summary["tokens"] == json.loads((single / "summary.json").read_text())["tokens"]


def test_slurm_tasks_become_torchrun_ranks(monkeypatch):
    """hydra/launcher=slurm with tasks_per_node > 1 (or srun) runs one task per rank without torchrun."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(key, "")  # recorded, so what the function exports is removed after the test
        monkeypatch.delenv(key)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "2"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    slurm_to_torchrun_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0
    before = dict(os.environ)
    slurm_to_torchrun_environment()  # torchrun's variables, once set, are left alone
    assert dict(os.environ) == before


def test_collectives_of_the_loop_use_the_backends_device(monkeypatch):
    """Under NCCL (every multi-GPU run) a collective on a CPU tensor raises: the loop, the checkpointer and the
    optimizer's trainer-side reductions all go through trainer.distributed, which puts the tensor on the GPU."""
    import re
    from pathlib import Path

    import torch

    from trainer import distributed

    root = Path(__file__).resolve().parents[1]
    direct = [f"{path.relative_to(root)}:{number}" for path in [root / "train.py", *(root / "trainer").glob("*.py")]
              if path.name != "distributed.py"
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"\bdist\.(all_reduce|all_gather|broadcast|reduce_scatter|reduce)\(", line)]
    assert direct == [], "collectives outside trainer/distributed.py: " + ", ".join(direct)
    # the loop's one collective per step: loss, tokens and the stop flags in one all-reduce
    loop = [n for n, line in enumerate((root / "train.py").read_text().splitlines(), 1)
            if re.search(r"\ball_reduce\(", line)]
    assert len(loop) == 1, f"train.py all-reduces at lines {loop}"
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
