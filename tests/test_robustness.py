"""Runs that survive: preemption signals, SIGKILL mid-save, corrupt or unsafe checkpoints, NaN steps,
bad input as one line, W&B unreachable, a failing multirun job. Most go through the real command line."""

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from trainer.checkpoint import (Checkpointer, CheckpointError, UnsafeCheckpointError, latest_checkpoint,
                                read_checkpoint, step_files)


@pytest.fixture
def run_train(tmp_path, tiny, train_cli):
    """``run_train(args, env=None)``: the tiny run with ``args``, in tmp_path, no evaluation until the end."""
    def run_train(args, env=None):
        return train_cli([*tiny, "trainer.eval_interval=1000", *args], tmp_path, env=env, check=False)

    return run_train


# --- checkpoint files, in process -----------------------------------------------------------

def _objects():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return OmegaConf.create({"model": {"width": 3}}), model, optimizer, scheduler


def test_keeps_last_k_and_skips_a_corrupt_latest(tmp_path):
    checkpointer = Checkpointer(tmp_path, *_objects(), keep=3)
    for step in range(1, 6):
        checkpointer.save({"step": step})
    assert [p.name for p in step_files(tmp_path)] == ["step-000005.pt", "step-000004.pt", "step-000003.pt"]
    assert (tmp_path / "last.pt").read_bytes() == (tmp_path / "step-000005.pt").read_bytes()
    # a save killed mid-write leaves a stray temporary file; a disk fault truncates the newest (and
    # its hard link last.pt): both are reported and the previous good checkpoint is used
    (tmp_path / "step-000006.pt.tmp").write_bytes(b"partial")
    data = (tmp_path / "step-000005.pt").read_bytes()
    (tmp_path / "step-000005.pt").write_bytes(data[: len(data) // 2])
    reports = []
    path, state = latest_checkpoint(tmp_path, report=reports.append)
    assert path.name == "step-000004.pt" and state["progress"]["step"] == 4
    assert len(reports) == 2 and all("step-000005.pt" in r or "last.pt" in r for r in reports)
    for p in [tmp_path / "last.pt", *step_files(tmp_path)]:
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        latest_checkpoint(tmp_path, report=reports.append)
    assert latest_checkpoint(tmp_path / "empty") is None


def test_refuses_non_finite_parameters(tmp_path):
    cfg, model, optimizer, scheduler = _objects()
    checkpointer = Checkpointer(tmp_path, cfg, model, optimizer, scheduler)
    checkpointer.save({"step": 1})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        checkpointer.save({"step": 2})
    assert latest_checkpoint(tmp_path)[1]["progress"]["step"] == 1


class _WritesMarker:
    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("container", ["pickle", "torch"])
def test_pickle_that_runs_code_is_refused(tmp_path, container):
    marker = tmp_path / "marker"
    _WritesMarker.marker = str(marker)
    planted = tmp_path / "checkpoints" / "last.pt"
    planted.parent.mkdir()
    payload = {"model": _WritesMarker(), "progress": {"step": 1}, "model_config": {}}
    if container == "pickle":
        planted.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, planted)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        read_checkpoint(planted)
    with pytest.raises(UnsafeCheckpointError):  # never skipped in favour of an older one
        latest_checkpoint(planted.parent)
    assert not marker.exists()
    planted.write_bytes(pickle.dumps(payload))  # newer protocols fail even earlier, still refused
    with pytest.raises(CheckpointError):
        read_checkpoint(planted)
    assert not marker.exists()


# --- the real command line --------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_save_then_sigterm_then_double_sigint(tmp_path, tiny, train_cli, wait_for):
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=100000", "trainer.checkpoint_interval=1", "trainer.keep_checkpoints=2",
            f"hydra.run.dir={run_dir}"]
    checkpoints = run_dir / "checkpoints"

    def steps_saved():
        return [int(p.name[5:11]) for p in step_files(checkpoints)]

    def popen():
        return subprocess.Popen(train_cli.command([*tiny, "trainer.eval_interval=1000", *args]), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # saving every step, so SIGKILL lands in or near a save
    process = popen()
    wait_for(lambda: len(steps_saved()) >= 2, process)
    time.sleep(0.13)
    process.kill()
    process.communicate()

    # it resumes; SIGTERM: the step finishes, a checkpoint is written, exit 143 for requeue
    before = max(steps_saved())
    process = popen()
    wait_for(lambda: max(steps_saved(), default=0) > before, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, out + err
    assert "Resuming from" in out
    line = next(line for line in err.splitlines() if line.startswith("SIGTERM at step"))
    stopped_at = int(line.split()[3].rstrip(":"))
    assert "checkpoint saved" in line and "143" in line
    assert max(steps_saved()) == stopped_at and len(steps_saved()) == 2

    # it resumes where SIGTERM stopped; a second signal exits at once, without a checkpoint.
    # (Two different signals: the OS merges a repeated pending one into a single delivery.)
    process = popen()
    wait_for(lambda: max(steps_saved()) > stopped_at, process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode in (130, 143), out + err
    assert f"at step {stopped_at}" in out and "again: exiting now" in err and "checkpoint saved" not in err
    assert latest_checkpoint(checkpoints) is not None


@pytest.mark.slow
def test_bad_corpus_files_are_one_line_errors(tmp_path, run_train, one_line_error):
    missing = one_line_error(run_train(["data=local", "data.train_path=/nope.tsv"]))
    assert "data.train_path" in missing and "/nope.tsv" in missing and "not found" in missing
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "train.fr").write_text("un\ndeux\n")
    misaligned = one_line_error(run_train(["data=local", f"data.train_path={tmp_path / 'train.en'}",
                                           f"data.train_target_path={tmp_path / 'train.fr'}"]))
    assert "not aligned" in misaligned and "train.fr" in misaligned
    (tmp_path / "latin1.tsv").write_bytes(b"ok\tbien\ncaf\xe9\tcaf\xc3\xa9\n")
    not_utf8 = one_line_error(run_train(["data=local", f"data.train_path={tmp_path / 'latin1.tsv'}"]))
    assert "UTF-8" in not_utf8 and "latin1.tsv" in not_utf8 and "line 2" in not_utf8


@pytest.mark.slow
def test_wandb_unreachable_runs_offline_resumes_same_run_and_rejects_other_model(tmp_path, run_train,
                                                                                  one_line_error):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9")
    run_dir = tmp_path / "run"
    # checkpoint by wall clock only (every step here), keeping one step file
    args = ["logger=wandb", "logger.mode=online", "trainer.checkpoint_interval=1000", "trainer.checkpoint_minutes=0",
            "trainer.keep_checkpoints=1", f"hydra.run.dir={run_dir}"]
    first = run_train([*args, "trainer.max_steps=2"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "offline" in first.stdout
    # W&B itself says nothing (no banner, no "Run history" / "Run summary" blocks); one line says where the run is
    output = first.stdout + first.stderr
    assert "Run history" not in output and "Run summary" not in output and "wandb:" not in output, output
    assert [line for line in first.stdout.splitlines() if line.startswith("W&B")] == [
        "W&B: no credentials (WANDB_API_KEY or `wandb login`), so offline run in "
        f"{next((run_dir / 'wandb').glob('offline-run-*'))} (upload it with `wandb sync`)"]  # one line: where
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in step_files(checkpoints)] == ["step-000002.pt"]
    run_id = torch.load(checkpoints / "last.pt", weights_only=True)["progress"]["wandb_id"]
    assert run_id and list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))

    second = run_train([*args, "trainer.max_steps=3"], env)
    assert second.returncode == 0 and "at step 2" in second.stdout, second.stdout + second.stderr
    assert torch.load(checkpoints / "last.pt", weights_only=True)["progress"]["wandb_id"] == run_id

    other = run_train(["logger=none", "model.d_ff=256", "trainer.max_steps=4", f"hydra.run.dir={run_dir}"])
    error = one_line_error(other)
    assert "model.d_ff: checkpoint 512 vs config 256" in error


@pytest.mark.slow
def test_nan_steps_skipped_and_a_failing_multirun_job_does_not_stop_the_sweep(tmp_path, run_train, metrics):
    sweep = tmp_path / "sweep"
    result = run_train(["-m", "trainer.max_bad_steps=2,3", "trainer.debug_nan_steps=[2,3]", "trainer.max_steps=4",
                     "trainer.checkpoint_interval=1", f"hydra.sweep.dir={sweep}",
                       "hydra.sweep.subdir=job${hydra.job.num}"])
    assert result.returncode == 1, result.stdout + result.stderr
    failed, done = sweep / "job0", sweep / "job1"  # max_bad_steps=2, =3
    error = json.loads((failed / "failed.json").read_text())["error"]
    assert "TrainingDiverged" in error and "max_bad_steps=2" in error
    assert "1 multirun job(s) failed" in result.stderr
    assert not (failed / "summary.json").exists() and not (done / "failed.json").exists()
    # the diverged job's last checkpoint is from before the bad steps or made no update since
    _, state = latest_checkpoint(failed / "checkpoints")
    assert state["progress"]["step"] == 2 and state["progress"]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())

    summary = json.loads((done / "summary.json").read_text())
    assert summary["step"] == 4 and summary["skipped_steps"] == 2
    records = metrics(done)
    assert [r["step"] for r in records if "loss" in r] == [1, 4]
    assert [r["skipped_steps"] for r in records if "loss" not in r and "valid_loss" not in r] == [1, 2]


@pytest.mark.slow
def test_resume_survives_a_torn_or_missing_metrics_log(tmp_path, run_train, metrics, one_line_error):
    """A log is never a reason not to resume: a torn last line (a crash or a full disk mid-write) is dropped,
    and a missing metrics.jsonl starts afresh. Resuming with another optimizer is refused before anything in the
    run directory is written."""
    run_dir = tmp_path / "run"
    args = ["trainer.checkpoint_interval=1", f"hydra.run.dir={run_dir}"]
    assert run_train([*args, "trainer.max_steps=2"]).returncode == 0
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    resumed = run_train([*args, "trainer.max_steps=3"])
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stdout + resumed.stderr
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3]
    (run_dir / "metrics.jsonl").unlink()
    resumed = run_train([*args, "trainer.max_steps=4"])
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout, resumed.stdout + resumed.stderr
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [4]
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    line = one_line_error(run_train([*args, "optim=adam", "trainer.max_steps=5"]))
    assert "optim.name: checkpoint 'sm3' vs config 'adam'" in line and "trainer.resume=never" in line
    assert {name: (run_dir / name).read_bytes() for name in before} == before
