"""The wheel installs as a library: built from this checkout, installed into a fresh venv that
holds torch and nothing else, it steps, and its metadata describes the library alone."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Run in the fresh venv: the installed copy is the one imported, it takes one step, and the
# metadata's long description is the library's README.
CHECK = r"""
import sys
from importlib.metadata import metadata
import torch
import sm3
assert sm3.__file__.startswith(sys.prefix), sm3.__file__
p = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
p.grad = torch.tensor([[0.5, -1.0], [2.0, -0.25]])
sm3.SM3([p], lr=0.1, fused=False).step()
# first step, beta 0: nu = g^2, so each entry moves by lr * sign(g)
want = torch.tensor([[0.9, -1.9], [2.9, 0.6]])
assert torch.allclose(p.detach(), want), p
meta = metadata("sm3")
print(meta["Description-Content-Type"])
sys.stdout.write(meta.get_payload())
"""


def _uv(*args: str) -> subprocess.CompletedProcess:
    # Offline first: everything needed (hatchling, torch's wheels) is in uv's cache wherever
    # `uv sync` has run; online only where the cache lacks it.
    for offline in (["--offline"], []):
        done = subprocess.run(["uv", *args, *offline], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode == 0:
            return done
    raise AssertionError(f"uv {' '.join(args)} failed:\n{done.stderr}")


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv")
def test_wheel_installs_with_only_torch_and_steps(tmp_path):
    _uv("build", "--wheel", "-q", "-o", str(tmp_path / "dist"))
    (wheel,) = (tmp_path / "dist").glob("sm3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sm3/csrc/sm3_fused.cpp" in names  # the fused CPU kernel is built from it on first use
    assert not [n for n in names if n.split("/")[0] in ("trainer", "models", "data", "scripts", "tests")]

    # torch and its dependencies exactly as uv.lock pins them (a lock installs without
    # resolving, so it works offline), then the wheel alone.
    lock = tmp_path / "lock" / "pylock.toml"
    lock.parent.mkdir()
    _uv("export", "--frozen", "--format", "pylock.toml", "--no-default-groups", "--no-emit-project", "-q",
        "-o", str(lock))
    venv = tmp_path / "venv"
    _uv("venv", "-q", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    _uv("pip", "sync", "-q", "--python", str(python), str(lock))
    _uv("pip", "install", "-q", "--no-deps", "--python", str(python), str(wheel))

    done = subprocess.run([str(python), "-I", "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    content_type, description = done.stdout.split("\n", 1)
    assert content_type == "text/markdown"
    assert description.strip() == (ROOT / "sm3" / "README.md").read_text().strip()
    assert "train.py" not in description  # not the training repository's README
