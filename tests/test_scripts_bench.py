"""The benchmark scripts: memory_table's meta-device state sizes, bench_optim end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scripts import memory_table
from scripts._shapes import MODELS, BertSpec, model_shapes, parameter_count
from sm3 import optimizer_state_bytes

ROOT = Path(__file__).resolve().parents[1]


def _small_translation_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.embedding = nn.Embedding(64, 16)
    model.transformer = nn.Transformer(
        d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
        batch_first=True,
    )
    return model


def _real_state_bytes(name: str, model: nn.Module) -> int:
    """State size after one real step on CPU, with gradients from a real backward pass."""
    tokens = torch.randint(0, 64, (2, 5))
    x = model.embedding(tokens)
    out = model.transformer(x, x)
    (out @ model.embedding.weight.T).logsumexp(-1).sum().backward()
    optimizer = memory_table.OPTIMIZERS[name](list(model.parameters()))
    optimizer.step()
    return optimizer_state_bytes(optimizer)


@pytest.mark.parametrize("name", list(memory_table.OPTIMIZERS))
def test_meta_state_matches_a_real_step(name):
    model = _small_translation_model()
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    meta_bytes, _ = memory_table.state_bytes(name, shapes, device="meta")
    assert meta_bytes == _real_state_bytes(name, model)
    cpu_bytes, how = memory_table.state_bytes(name, shapes, device="cpu")
    assert how == "step()" and cpu_bytes == meta_bytes


def test_an_optimizer_that_cannot_step_on_meta_gets_the_state_of_a_real_step(monkeypatch):
    # Adafactor's step reads values (.item()), which meta tensors lack: its own _init_group makes the state.
    # Whether today's torch steps it on meta or not, the fallback is forced here, and must size the state alike.
    shapes = [("w", (4, 3)), ("b", (3,))]
    stepped, how = memory_table.state_bytes("Adafactor", shapes, device="cpu")
    assert how == "step()" and stepped > 0

    def meta_step(self, closure=None):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(torch.optim.Adafactor, "step", meta_step)
    assert memory_table.state_bytes("Adafactor", shapes, device="meta") == (stepped, "_init_group()")


def test_shapes_parameter_counts():
    assert parameter_count(model_shapes(MODELS["base"])) == 60_524_544  # 44.1M + 16.4M embedding
    assert parameter_count(model_shapes(MODELS["big"])) == 209_129_472
    # BERT-Large with its pre-training heads: 336M (the "340M" of the BERT paper).
    assert parameter_count(model_shapes(MODELS["bert-large"])) == 336_226_108


def test_memory_table_orders_optimizers_as_the_paper():
    lines, _, per_sequence = memory_table.memory_lines(
        BertSpec("BERT-small", d_model=64, d_ff=256, heads=4, layers=2, vocab=500), seq_len=32, memory_gib=0.01
    )
    by_name = {line.optimizer: line for line in lines}
    assert per_sequence > 0
    assert by_name["SM3 (m=0)"].state_bytes < by_name["Adagrad"].state_bytes < by_name["Adam"].state_bytes
    assert by_name["SM3 (m=0)"].max_batch >= by_name["Adagrad"].max_batch >= by_name["Adam"].max_batch
    text = memory_table.main(["--models", "tiny", "--memory-gib", "0.01"])
    assert all(f"| {name} |" in text for name in memory_table.OPTIMIZERS)


@pytest.mark.slow
def test_bench_optim_tiny_end_to_end(tmp_path):
    from scripts import bench_optim

    out, png = tmp_path / "bench.md", tmp_path / "bench.png"
    # A subprocess keeps the profiler and thread settings out of this one. SM3_DISABLE_NATIVE
    # keeps the test from compiling the fused CPU kernel: the fused rows are still built with
    # fused=True (and fall back, with a warning the table records).
    env = dict(os.environ, SM3_DISABLE_NATIVE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_optim.py"), "--model", "tiny", "--rounds", "2",
         "--threads", "1", "--keep-freed-memory", "--out", str(out), "--plot", str(png)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    expected = [label for label, _ in bench_optim.optimizer_factories("cpu")]
    assert len(expected) == (11 if bench_optim.sm3_has_fused() else 7)
    for label in expected:
        assert f"| {label} |" in table
    assert "threads: 1" in table and "keeping freed memory" in table and "60,524,544" not in table
    assert png.stat().st_size > 10_000


_REFAULTS = """
import resource, sys, torch
from scripts import bench_optim
if sys.argv[2] == "keep":
    assert bench_optim.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # an optimizer step's temporaries (two of 64 MB), freed at its end
    temporaries = [torch.ones(n) for n in (16 << 20, 1 << 20, 4 << 20, 16 << 20)]
    del temporaries
for _ in range(3):
    step()
counts = []
for _ in range(3):  # the fewest refaults of three steps: a step that happened to grow the heap is not steady
    before = faults()
    step()
    counts.append(faults() - before)
print(min(counts))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_freed_blocks():
    def refaults(mode):
        result = subprocess.run([sys.executable, "-c", _REFAULTS, str(ROOT / "scripts"), mode],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.split()[-1])

    # By default glibc unmaps the 64 MB blocks when freed: 16384 faults (4 KiB pages) each to
    # map them again every step. Kept, a steady-state step reuses the freed memory.
    assert refaults("default") > 16000
    assert refaults("keep") < 1000


@pytest.mark.slow
def test_bench_loop_measures_both_loops(tmp_path):
    out = tmp_path / "loop.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_loop.py"), "--steps", "40", "--rounds", "1", "--out", str(out),
         "data.num_train=400", "data.num_valid=8", "data.num_test=8", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    rates = [float(line.split("|")[2]) for line in table.splitlines() if line.startswith("| ") and "loop" not in line
             and "---" not in line]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    assert "overhead" in table and "%" in table


@pytest.mark.slow
def test_bench_study_step_end_to_end(tmp_path):
    """Both tasks' runs step as the record's runs did and as train.py does now, with identical losses (the
    script stops otherwise), and the .json the study's report reads has a step ratio per task."""
    out = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_study_step.py"), "--rounds", "2",
                             "--steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| mt | float32 | 4 |" in out.read_text() or "| mt | bf16 autocast | 4 |" in out.read_text()
    ratios = json.loads(out.with_suffix(".json").read_text())["step_ratio"]
    assert set(ratios) == {"mt", "lm"} and all(0 < r < 2 for r in ratios.values())
