"""Faults a cluster throws and input a new user gets wrong: a full disk at every write site, two processes on
one run directory, a signal during a multirun, resuming with another optimizer, out-of-range values, an
unwritable run directory. Each was a reproduction that failed before the fix."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import trainer.files
from trainer import config
from trainer.checkpoint import Checkpointer, latest_checkpoint, step_files
from trainer.errors import ConfigError
from trainer.files import RunDirLock, StorageError
from trainer.runlog import RunLog
from trainer.state import TrainState


# --- a full disk at every write site, in process ------------------------------------------------

class _FullDisk:
    """``open`` for trainer.files: files take ``budget`` bytes in all, then writes fail with ENOSPC."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        if "r" in mode and "+" not in mode:
            return real
        disk = self

        class Proxy:
            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, data):
                take = min(len(data), disk.budget)
                real.write(data[:take])
                disk.budget -= take
                if take < len(data):
                    real.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                return take

        return Proxy()


def _objects():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return OmegaConf.create({"model": {"width": 64}, "optim": {"name": "sgd"}}), model, optimizer, scheduler


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path, *_objects())
    checkpointer.save({"step": 1})
    monkeypatch.setattr(trainer.files, "open", _FullDisk(budget=2000), raising=False)
    with pytest.raises(StorageError, match=r"step-000002\.pt.*No space left.*free space.*re-run the same command"):
        checkpointer.save({"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-000001.pt"]  # no .tmp left behind
    assert latest_checkpoint(tmp_path)[1]["progress"]["step"] == 1


def test_full_disk_while_logging_leaves_no_torn_line_and_no_partial_file(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"logger": {"name": "none", "mode": "disabled"}, "x": 1})
    log = RunLog(cfg, tmp_path, is_main=True)
    log.start(TrainState())
    log.log({"step": 1, "loss": 2.0})
    monkeypatch.setattr(trainer.files, "open", _FullDisk(budget=5), raising=False)
    with pytest.raises(StorageError, match="metrics.jsonl"):
        log.log({"step": 2, "loss": 1.5})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    with pytest.raises(StorageError, match="summary.json"):
        log.write_summary({"step": 2, "loss": 1.5})
    with pytest.raises(StorageError, match="config.yaml"):
        log.start(TrainState())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert OmegaConf.load(tmp_path / "config.yaml").x == 1


# --- the run directory lock --------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_process_on_a_run_directory_is_refused_and_a_killed_holder_never_blocks(tmp_path, tiny, train_cli,
                                                                                         one_line_error):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):  # this process plays the first run
        second = train_cli([*tiny, "trainer.max_steps=1", f"hydra.run.dir={run_dir}"], tmp_path, check=False)
        error = one_line_error(second)
        assert f"in use by process {os.getpid()}" in error
        assert not (run_dir / "metrics.jsonl").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.files import RunDirLock\n"
                               f"RunDirLock(__import__('pathlib').Path({str(run_dir)!r})).__enter__()\n"
                               "print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
        RunDirLock(run_dir).__enter__()
    holder.kill()
    holder.wait()
    with RunDirLock(run_dir):  # the kernel dropped the killed process's lock
        pass


# --- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("override,named", [
    ("trainer.grad_accum=0", "trainer.grad_accum=0"), ("trainer.max_steps=-5", "trainer.max_steps=-5"),
    ("trainer.checkpoint_interval=0", "trainer.checkpoint_interval=0"), ("trainer.log_interval=0", "log_interval=0"),
    ("trainer.eval_interval=0", "eval_interval=0"), ("optim.lr=-0.1", "optim.lr=-0.1"),
    ("optim.momentum=1.5", "optim.momentum=1.5"), ("+optim.lrr=0.1", "unknown key optim.lrr"),
    ("+trainer.max_stesp=5", "unknown key trainer.max_stesp"), ("model.heads=3", "divisible by model.heads=3"),
])
def test_out_of_range_values_and_unknown_keys_are_refused(compose, override, named):
    with pytest.raises(ConfigError, match=named.replace("+", r"\+")) as error:
        config.validate(compose([override]))
    assert "\n" not in str(error.value)
    config.validate(compose([]))  # the defaults pass


def test_every_checked_range_is_a_key_of_a_schema():
    # validate() skips a key it cannot find (OmegaConf.select gives None): a misspelt RANGES key checks nothing
    import dataclasses

    schemas = {"model": [config.ModelConfig], "optim": [config.OptimConfig], "schedule": [config.ScheduleConfig],
               "data": [config.DataConfig, config.LMDataConfig], "trainer": [config.TrainerConfig]}
    for key in config.RANGES:
        group, name = key.split(".")
        assert any(name in {f.name for f in dataclasses.fields(schema)} for schema in schemas[group]), key


@pytest.mark.slow
def test_bad_values_through_the_cli_are_one_line_and_exit_2(tmp_path, train_cli, one_line_error):
    result = train_cli(["+optim.lrr=0.1", "trainer.grad_accum=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                       tmp_path, check=False)
    line = one_line_error(result)
    assert "valid keys of optim: name, lr," in line and "trainer.grad_accum=0 is out of range (valid: >= 1)" in line
    assert "Error executing job" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override", ["optim.lr=-1", "trainer.max_steps=-5", "+optim.lrr=1"])
def test_a_run_refused_at_start_leaves_no_run_directory(tmp_path, train_cli, one_line_error, override):
    one_line_error(train_cli([override, "logger=none"], tmp_path, check=False))
    assert not (tmp_path / "outputs").exists(), sorted(str(p) for p in (tmp_path / "outputs").rglob("*"))


@pytest.mark.slow
def test_a_bad_override_on_an_existing_run_directory_keeps_its_files(tmp_path, train_cli, one_line_error):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    earlier = {"metrics.jsonl": '{"step": 1}\n', "summary.json": "{}\n", "checkpoints/last.pt": "weights"}
    for name, text in earlier.items():
        (run_dir / name).write_text(text)
    one_line_error(train_cli(["optim.lr=-1", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, check=False))
    assert {name: (run_dir / name).read_text() for name in earlier} == earlier
    existing = tmp_path / "existing"  # even empty, a directory made before this run is not this run's to remove
    existing.mkdir()
    one_line_error(train_cli(["optim.lr=-1", "logger=none", f"hydra.run.dir={existing}"], tmp_path, check=False))
    assert existing.is_dir()


@pytest.mark.slow
def test_an_unwritable_run_directory_is_one_line(tmp_path, train_cli, one_line_error):
    (tmp_path / "file").write_text("not a directory")
    line = one_line_error(train_cli(["logger=none", f"hydra.run.dir={tmp_path / 'file' / 'run'}"], tmp_path,
                                    check=False))
    assert "cannot write" in line and "hydra.run.dir" in line
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                      capture_output=True).returncode != 0:
        return  # needs root; the case above takes the same path
    try:
        line = one_line_error(train_cli(["logger=none", f"hydra.run.dir={read_only / 'run'}"], tmp_path, check=False))
        assert "Read-only file system" in line and "hydra.run.dir" in line
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


@pytest.mark.slow
def test_sigterm_stops_a_multirun_and_the_same_command_resumes_then_skips(tmp_path, tiny, train_cli, metrics,
                                                                           wait_for):
    sweep = tmp_path / "sweep"
    args = ["-m", "optim=sm3,adam", *tiny, "trainer.max_steps=30", "trainer.eval_interval=1000",
            "trainer.checkpoint_interval=1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}"]
    process = subprocess.Popen(train_cli.command(args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(lambda: step_files(sweep / "job0" / "checkpoints"), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, out + err
    assert "SIGTERM at step" in err and "job0" in err and not (sweep / "job1").exists()  # job 1 never started
    stopped = max(int(p.name[5:11]) for p in step_files(sweep / "job0" / "checkpoints"))
    assert stopped < 30

    again = train_cli(args, tmp_path)  # job 0 resumes where it stopped, job 1 runs
    assert f"at step {stopped}" in again.stdout
    assert [json.loads((sweep / job / "summary.json").read_text())["step"] for job in ("job0", "job1")] == [30, 30]
    assert metrics(sweep / "job0", "step")[-1] == 30
    logs = {job: (sweep / job / "metrics.jsonl").read_bytes() for job in ("job0", "job1")}

    third = train_cli(args, tmp_path)  # both finished: their results, no work, no writes
    assert third.stdout.count("Already finished: test BLEU") == 2
    assert {job: (sweep / job / "metrics.jsonl").read_bytes() for job in logs} == logs


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_then_freed_space_resumes(tmp_path, tiny, train_cli, one_line_error):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        args = [*tiny, "trainer.max_steps=4", "trainer.checkpoint_interval=1", "trainer.keep_checkpoints=5",
                "trainer.polyak=false", "trainer.eval_interval=1000", f"hydra.run.dir={small / 'run'}"]
        line = one_line_error(train_cli(args, tmp_path, check=False))  # a checkpoint is ~8.5 MB: 20 MB fill up
        assert "No space left on device" in line and "re-run the same command" in line
        checkpoints = small / "run" / "checkpoints"
        assert not list(checkpoints.glob("*.tmp"))
        saved = latest_checkpoint(checkpoints)[1]["progress"]["step"]
        subprocess.run(["mount", "-o", "remount,size=200m", str(small)], check=True)
        resumed = train_cli(args, tmp_path)
        assert f"at step {saved}" in resumed.stdout
        assert json.loads((small / "run" / "summary.json").read_text())["step"] == 4
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
