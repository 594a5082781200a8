"""trainer.parallel=fsdp: 2 CPU processes (gloo, FSDP2) through the real command line give the losses of
1 process with the same global batch; a resumed FSDP run continues exactly (and, resharded, on another
world size); sharded DCP checkpoints keep checkpoint.py's guarantees (in process, a one-rank group)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from trainer.checkpoint import Checkpointer, CheckpointError, UnsafeCheckpointError, latest_checkpoint, step_dirs

# One pytest-xdist worker runs the module, so its runs (four launches of train.py) happen once.
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
              pytest.mark.xdist_group("test_fsdp_train")]

# tests/test_ddp.py's settings, plus gradient clipping (the norm must cover every rank's shards), Polyak
# averaging (the averaged copy is sharded too) and an evaluation during training (every rank takes part)
COMMON = ["model=transformer_tiny", "model.dropout=0.0", "logger=none", "trainer.progress=false",
          "trainer.precision=fp32",  # the same numbers on any CPU: auto picks bf16 on some
          "data.num_train=300", "data.num_valid=8", "data.num_test=8", "data.max_tokens=512", "trainer.eval_max_len=8",
          "trainer.log_interval=1", "trainer.eval_interval=3", "schedule.warmup_steps=2", "trainer.clip_norm=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, train_cli):
    """4 steps of 4 batches: 1 process with grad_accum=4; 2 FSDP ranks with grad_accum=2 (gradient sync
    skipped on the first micro-step), checkpointing at step 2; that run cut back to its step-2
    checkpoint (as if stopped there) and resumed to step 4 on 2 ranks, and on 1 FSDP rank with
    grad_accum=4 (the same global batches)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    fsdp = ["trainer.parallel=fsdp", "trainer.checkpoint_interval=2", "trainer.max_steps=4"]
    out = {name: tmp / name for name in ("single", "straight", "resumed", "resharded")}

    def run(launcher, run_dir, *overrides):
        return train_cli([*COMMON, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides], tmp,
                         launcher=launcher)

    run(None, out["single"], "trainer.grad_accum=4", "trainer.max_steps=4")
    out["straight_stdout"] = run(train_cli.torchrun(2), out["straight"], *fsdp,
                                 "trainer.grad_accum=2").stdout
    for name, processes, grad_accum in (("resumed", 2, 2), ("resharded", 1, 4)):
        shutil.copytree(out["straight"], out[name])
        shutil.rmtree(out[name] / "checkpoints" / "step-000004")
        (out[name] / "summary.json").unlink()  # as if stopped at step 2: not finished
        out[f"{name}_stdout"] = run(train_cli.torchrun(processes), out[name], *fsdp,
                                    f"trainer.grad_accum={grad_accum}").stdout
    return out


@pytest.mark.slow
def test_two_fsdp_processes_match_one_with_the_same_global_batch(runs, metrics):
    one, two = metrics(runs["single"], "loss"), metrics(runs["straight"], "loss")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    assert runs["straight_stdout"].count("process(es)") == 1  # rank 0 alone prints and logs
    for key in ("valid_loss", "valid_loss_averaged"):  # at step 3 (not a checkpoint step) and the end
        assert metrics(runs["straight"], key) == pytest.approx(metrics(runs["single"], key), rel=1e-5)
    single, sharded = (json.loads((runs[name] / "summary.json").read_text()) for name in ("single", "straight"))
    assert sharded["step"] == 4
    for key in ("valid_loss", "test_loss", "test_loss_averaged"):  # every rank evaluated; the averaged copy too
        assert sharded[key] == pytest.approx(single[key], rel=1e-5), key
    checkpoints = runs["straight"] / "checkpoints"
    assert [p.name for p in step_dirs(checkpoints)] == ["step-000004", "step-000002"]
    assert not list(checkpoints.glob("*.tmp"))
    assert {p.name for p in (checkpoints / "step-000004").iterdir()} == {
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "rng-0.pt", "rng-1.pt"}


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_reshards_to_another_world_size(runs, metrics):
    straight = metrics(runs["straight"], "loss")
    summary = {name: json.loads((runs[name] / "summary.json").read_text()) for name in ("straight", "resharded")}
    assert "Resuming from" in runs["resumed_stdout"] and "step-000002 at step 2" in runs["resumed_stdout"]
    assert runs["resumed_stdout"].count("Resuming from") == 1  # rank 0 alone says so
    assert metrics(runs["resumed"], "loss") == straight  # same world size: bit for bit
    assert "step-000002 at step 2" in runs["resharded_stdout"] and "1 process(es)" in runs["resharded_stdout"]
    assert metrics(runs["resharded"], "loss") == pytest.approx(straight, rel=1e-5)  # 2 ranks -> 1, the same batches
    assert summary["resharded"]["test_loss_averaged"] == pytest.approx(summary["straight"]["test_loss_averaged"],
                                                                       rel=1e-5)


@pytest.mark.slow
def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path, train_cli, one_line_error):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS")}
    result = train_cli([*COMMON, "trainer.parallel=fsdp", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env=env,
                       check=False)
    assert "trainer.parallel=fsdp needs torchrun" in one_line_error(result)


# --- sharded checkpoint directories, in process (a one-rank gloo group) ------------------------

@pytest.fixture
def one_rank(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))

    def objects(width=3, seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.Linear(4, 2))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model(torch.ones(1, width)).sum().backward()
        optimizer.step()
        return OmegaConf.create({"model": {"width": width}}), model, optimizer, scheduler

    try:
        yield objects
    finally:
        dist.destroy_process_group()


def _progress(step):
    return {"step": step, "epoch": 0, "batch_index": step}


def test_sharded_checkpoints_keep_k_skip_incomplete_and_refuse_unsafe(tmp_path, one_rank):
    cfg, model, optimizer, scheduler = one_rank()
    checkpointer = Checkpointer(tmp_path, cfg, model, optimizer, scheduler, sharded=True, keep=3)
    for step in range(1, 6):
        checkpointer.save(_progress(step))
    assert [p.name for p in step_dirs(tmp_path)] == ["step-000005", "step-000004", "step-000003"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(CheckpointError, match="sharded checkpoints .* trainer.parallel=fsdp"):
        latest_checkpoint(tmp_path)  # a 1-process/DDP run is told, not silently restarted

    # a save killed midway leaves only a temporary directory; a truncated shard is skipped with a report
    (tmp_path / "step-000006.tmp").mkdir()
    shard = tmp_path / "step-000005" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    expected = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    _, fresh, fresh_optimizer, fresh_scheduler = one_rank(seed=1)
    reports = []
    restorer = Checkpointer(tmp_path, cfg, fresh, fresh_optimizer, fresh_scheduler, sharded=True, report=reports.append)
    path, progress = restorer.load()
    assert path.name == "step-000004" and progress["step"] == 4
    assert len(reports) == 1 and "step-000005" in reports[0] and "incomplete" in reports[0]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.full_tensor(), expected[key])
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].full_tensor().abs().sum() > 0

    # saving step 5 again (after resuming from 4) replaces the truncated one
    Checkpointer(tmp_path, cfg, model, optimizer, scheduler, sharded=True, keep=3).save(_progress(5))
    assert restorer.load()[1]["step"] == 5

    # another model: refused, naming the field
    other_cfg = OmegaConf.create({"model": {"width": 5}})
    with pytest.raises(CheckpointError, match="model.width: checkpoint 3 vs config 5"):
        Checkpointer(tmp_path, other_cfg, *one_rank(width=5)[1:], sharded=True).load()

    # a .metadata that would run code when unpickled: refused (never skipped), and nothing runs
    marker = tmp_path / "marker"

    class WritesMarker:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    (tmp_path / "step-000005" / ".metadata").write_bytes(pickle.dumps(WritesMarker()))
    with pytest.raises(UnsafeCheckpointError, match="names pathlib.Path.write_text, which could run code"):
        restorer.load()
    assert not marker.exists()


def test_sharded_save_refuses_non_finite_parameters_and_single_files(tmp_path, one_rank):
    cfg, model, optimizer, scheduler = one_rank()
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ddp" / "step-000001.pt").write_bytes(b"a 1-process checkpoint")
    with pytest.raises(CheckpointError, match="single-file checkpoints"):
        Checkpointer(tmp_path / "ddp", cfg, model, optimizer, scheduler, sharded=True).load()
    with torch.no_grad():
        model[1].weight.to_local()[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="1.weight is not finite"):
        Checkpointer(tmp_path, cfg, model, optimizer, scheduler, sharded=True).save(_progress(2))
    assert step_dirs(tmp_path) == []
