"""scripts/compare.py on a real two-job multirun plus a failed job: table, comparison.md, plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.compare import compare, split_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_split_overrides_keeps_bracketed_values_whole():
    assert split_overrides("optim=adam,optim.betas=[0.9,0.98],x='a,b'") == [
        "optim=adam", "optim.betas=[0.9,0.98]", "x='a,b'"]


@pytest.mark.slow
def test_compare_a_real_multirun_with_a_failed_job(tmp_path, tiny, train_cli):
    sweep = tmp_path / "sweep"
    train_cli(["-m", "optim=sm3,adam", *tiny, "trainer.max_steps=4", "trainer.eval_interval=2",
               f"hydra.sweep.dir={sweep}"], tmp_path)
    ran = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(ran) == 2
    # A job that crashed: same shared overrides, its own optimizer, failed.json and no summary.
    failed = sweep / ran[0].name.replace("optim=adam", "optim=adagrad")
    failed.mkdir()
    (failed / "failed.json").write_text(json.dumps({"error": "RuntimeError: CUDA out of memory\nat step 3"}))

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), str(sweep)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"`optim=adagrad`", "`optim=adam`", "`optim=sm3`"}  # shared overrides left out
    assert "failed: RuntimeError: CUDA out of memory at step 3" in rows["`optim=adagrad`"]
    for job in ("adam", "sm3"):
        cells = [c.strip() for c in rows[f"`optim={job}`"].split("|")[1:-1]]
        assert cells[2] == job and cells[4] == "1024 x 1" and cells[-1] == "ok"
        assert float(cells[7]) > 0  # optimizer state MB
    adam_state = float(rows["`optim=adam`"].split("|")[8])
    sm3_state = float(rows["`optim=sm3`"].split("|")[8])
    assert sm3_state < adam_state

    report = (sweep / "comparison.md").read_text()
    assert "optim=adagrad" in report and "model=transformer_tiny" in report  # shared overrides listed once
    for name in ("loss.png", "bleu.png", "optimizer_memory.png"):
        png = sweep / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name

    # --out puts the plots elsewhere; an incomplete job (metrics, no summary) is marked as such
    incomplete = sweep / ran[0].name.replace("optim=adam", "optim=sgd")
    incomplete.mkdir()
    (incomplete / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0, "lr": 0.1}) + "\n")
    table = compare(sweep, tmp_path / "plots")
    assert "| incomplete |" in table.replace("`optim=sgd`", "")
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 10_000
    assert "![loss](loss.png)" in (tmp_path / "plots" / "comparison.md").read_text()  # links relative to it


def _fake_job(root: Path, name: str, bleu: float, curve: list[float]) -> None:
    job = root / name
    job.mkdir(parents=True)
    (job / "config.yaml").write_text("optim:\n  name: sm3\n")
    records = [{"step": 100 * (i + 1), "train_seconds": 10.0 * (i + 1), "valid_bleu_averaged": v}
               for i, v in enumerate(curve)]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (job / "summary.json").write_text(json.dumps({"test_bleu": bleu - 1, "test_bleu_averaged": bleu,
                                                  "valid_bleu_averaged": curve[-1], "tokens_per_second": 1000.0}))


def test_seeds_give_mean_and_std_and_a_band_plot(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, bleu in enumerate([40.0, 42.0, 44.0]):
        _fake_job(sweep, f"optim.lr=0.1,trainer.seed={seed}", bleu, [10.0 + seed, 20.0 + seed])
    _fake_job(sweep, "optim.lr=0.2", 30.0, [5.0, 8.0])
    report = compare(sweep)
    text = (sweep / "comparison.md").read_text()
    assert report in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `optim.lr")}
    seeds = [c.strip() for c in rows["`optim.lr=0.1`"].split("|")[1:-1]]
    assert seeds[1:4] == ["3", "42.00 ± 2.00", "41.00 ± 2.00"]  # sample std of 40, 42, 44
    assert [c.strip() for c in rows["`optim.lr=0.2`"].split("|")[1:-1]][1:3] == ["1", "30.00"]
    assert (sweep / "seeds.png").stat().st_size > 10_000 and "![seeds](seeds.png)" in text
