"""Fixtures shared by the SM3 library's tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture
def run_python():
    """``run(code, **env)``: runs ``code`` in a fresh interpreter that imports this checkout's
    ``sm3`` and the reference (``reference_sm3``); returns the finished process."""

    def run(code: str, timeout: float = 300, cwd=None, pythonpath=(ROOT, HERE), **env) -> subprocess.CompletedProcess:
        path = os.pathsep.join([*(str(p) for p in pythonpath), os.environ.get("PYTHONPATH", "")])
        return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=path, **env),
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)

    return run


@pytest.fixture
def triton_interpreter(run_python):
    """``run(code)`` under Triton's CPU interpreter (skips the test when Triton is missing)."""
    pytest.importorskip("triton")
    return lambda code: run_python(code, TRITON_INTERPRET="1")


@pytest.fixture
def spawn_ranks(tmp_path):
    """``spawn(worker, *args, world_size=2)``: ``worker(rank, world_size, store, *args)`` in one process
    per rank; ``store`` is a file for ``init_process_group(init_method="file://...")``."""
    import torch.multiprocessing as mp

    def spawn(worker, *args, world_size: int = 2) -> None:
        store = tmp_path / f"store-{worker.__name__}"
        store.unlink(missing_ok=True)
        mp.spawn(worker, args=(world_size, str(store), *args), nprocs=world_size)

    return spawn
