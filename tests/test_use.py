"""Using a trained run: scripts/sample.py and scripts/translate.py through the one loader (trainer/trained.py),
train.py's trainer.eval_only and trainer.init_from, and the line each prints about what it loaded."""

import json
import os
from pathlib import Path

import pytest
import torch

from models import TransformerLM
from scripts import sample, translate
from trainer.checkpoint import read_checkpoint
from trainer.trained import load_trained

# Under pytest-xdist the module's tests share one worker, so each trained run is trained once.
pytestmark = pytest.mark.xdist_group("test_use")

LM_STEPS, MT_STEPS = ["trainer.max_steps=4"], ["trainer.max_steps=3"]


def test_the_modules_tests_share_one_worker(request):
    # pytest 9.2 ignored the group pytest-xdist 3.8 gives a test (its nodeid's "@group" suffix): the grouped
    # modules' tests spread over the workers, and each worker trained the shared runs again (pyproject.toml).
    if request.config.getoption("dist", "no") == "loadgroup" or os.environ.get("PYTEST_XDIST_WORKER"):
        assert request.node.nodeid.endswith("@test_use")


def trained_run(tmp_path_factory, train_cli, overrides, name):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train_cli([*overrides, f"hydra.run.dir={run_dir}"], run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_lm, train_cli):
    """(run directory, its overrides): a tiny language model trained for 4 steps."""
    overrides = [*tiny_lm, *LM_STEPS]
    return trained_run(tmp_path_factory, train_cli, overrides, "lm"), overrides


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, tiny, train_cli):
    """The same for translation, 3 steps."""
    overrides = [*tiny, *MT_STEPS]
    return trained_run(tmp_path_factory, train_cli, overrides, "mt"), overrides


def test_sampling_feeds_at_most_the_context():
    torch.manual_seed(0)
    model = TransformerLM(20, 16, 32, 2, 1, dropout=0.0, max_positions=8).eval()
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    new = sample.sample(model, [2, 5, 6], 20, 8, 1.0, None, torch.Generator().manual_seed(0), eos_id=3,
                        banned=[0, 2, 3])  # eos banned: all 20 tokens come, past max_positions
    assert len(new) == 20 and max(lengths) == 8


def greedy(model, ids, steps, context, eos_id, banned):
    """The likeliest next token, again and again: what top-k 1 must give."""
    ids = list(ids)
    for _ in range(steps):
        logits = model(torch.tensor([ids[-context:]]))[0, -1]
        logits[banned] = -float("inf")
        if int(logits.argmax()) == eos_id:
            break
        ids.append(int(logits.argmax()))
    return ids


@pytest.mark.slow
def test_sample_is_seeded_and_top_k_1_is_greedy(lm_run, capsys):
    run_dir, _ = lm_run
    trained = load_trained(run_dir, "transformer_lm")
    tok = trained.task.tokenizer
    prompt, context, banned = [tok.bos_id, *tok.encode("twenty")], trained.cfg.data.seq_len, [tok.pad_id, tok.bos_id]

    def draw(seed, temperature=1.0, top_k=None):
        return sample.sample(trained.model, prompt, 24, context, temperature, top_k,
                             torch.Generator().manual_seed(seed), tok.eos_id, banned)

    assert draw(0) == draw(0) and draw(0) != draw(1)
    expected = greedy(trained.model, prompt, 24, context, tok.eos_id, banned)[len(prompt):]
    assert draw(0, top_k=1) == draw(1, top_k=1) == draw(1, temperature=2.0, top_k=1) == expected
    assert draw(0, temperature=0.0) == expected

    sample.main([str(run_dir), "twenty", "--max-new-tokens", "8", "--seed", "3"])
    first = capsys.readouterr()
    assert f"loaded {run_dir}/checkpoints/last.pt (step 4, averaged parameters)" in first.err
    assert len(first.out.splitlines()) == 1 and first.out.startswith("twenty")
    sample.main([str(run_dir), "twenty", "--max-new-tokens", "8", "--seed", "3"])
    assert capsys.readouterr().out == first.out  # the command line is seeded too
    sample.main([str(run_dir / "checkpoints" / "step-000004.pt"), "", "--last-iterate", "--max-new-tokens", "4"])
    assert f"loaded {run_dir}/checkpoints/step-000004.pt (step 4, last-iterate parameters)" in capsys.readouterr().err


@pytest.mark.slow
def test_translate_says_what_it_loaded_and_refuses_a_language_model(mt_run, lm_run, tmp_path, capsys):
    (sources := tmp_path / "src.txt").write_text("twenty-one\n")
    translate.main([str(mt_run[0]), "--input", str(sources)])
    out = capsys.readouterr()
    assert f"loaded {mt_run[0]}/checkpoints/last.pt (step 3, averaged parameters)" in out.err
    assert len(out.out.splitlines()) == 1
    with pytest.raises(SystemExit) as refused:
        translate.main([str(lm_run[0]), "--input", str(sources)])
    assert str(refused.value.code).startswith("error: ") and "model.name=transformer_lm" in str(refused.value.code)


def files(run_dir: Path) -> dict:
    """Every file's bytes, but the lock (it holds the PID of whoever holds it) and Hydra's log (appended to by
    every command on the run, as a resume does)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in (".lock", "train.log")}


@pytest.mark.slow
@pytest.mark.parametrize("which,split", [("mt_run", "both"), ("lm_run", "test")])
def test_eval_only_repeats_the_summary_and_changes_nothing(which, split, request, train_cli):
    run_dir, overrides = request.getfixturevalue(which)
    before = files(run_dir)
    result = train_cli([*overrides, f"hydra.run.dir={run_dir}", "trainer.eval_only=true", f"trainer.eval_split={split}"],
                       run_dir.parent)
    step = json.loads((run_dir / "summary.json").read_text())["step"]
    assert f"trainer.eval_only: loaded {run_dir}/checkpoints/last.pt (step {step}, " in result.stdout
    after = files(run_dir)
    written = {Path(f"eval-{s}.json") for s in (["valid", "test"] if split == "both" else [split])}
    assert after.keys() - before.keys() == written
    assert {k: after[k] for k in before} == before  # config, metrics, summary, checkpoints, .hydra: untouched
    summary = json.loads(before[Path("summary.json")])
    for name in written:
        evaluated = json.loads(after[name])
        numbers = {k: v for k, v in evaluated.items() if k != "examples"}
        assert numbers == {k: summary[k] for k in numbers} and len(numbers) >= 5  # step, loss, ppl (+ averaged)


@pytest.mark.slow
def test_eval_only_without_a_checkpoint_is_one_error(tmp_path, tiny_lm, train_cli, one_line_error):
    run_dir = tmp_path / "never-trained"
    result = train_cli([*tiny_lm, f"hydra.run.dir={run_dir}", "trainer.eval_only=true"], tmp_path, check=False)
    assert "trainer.eval_only: no checkpoint in" in one_line_error(result)
    assert not run_dir.exists()  # the directory this command made is taken away again


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_weights(lm_run, tmp_path, tiny_lm, train_cli):
    source_dir, _ = lm_run
    source = read_checkpoint(source_dir / "checkpoints" / "last.pt")
    run_dir = tmp_path / "fine-tuned"
    # The one step's loss is made NaN, so the update is skipped: the checkpoint holds the weights it started from.
    command = [*tiny_lm, f"hydra.run.dir={run_dir}", f"trainer.init_from={source_dir}", "trainer.debug_nan_steps=[1]"]
    result = train_cli([*command, "trainer.max_steps=1"], tmp_path)
    assert f"trainer.init_from: loaded {source_dir}/checkpoints/last.pt (step 4, last-iterate parameters)" \
        in result.stdout and "Resuming" not in result.stdout
    started = read_checkpoint(run_dir / "checkpoints" / "step-000001.pt")
    assert started["progress"]["step"] == 1 and started["optimizer"]["state"] == {}  # from step 0, a fresh optimizer
    assert started["scheduler"]["last_epoch"] == 0 and source["scheduler"]["last_epoch"] == 4
    for name, tensor in source["model"].items():
        assert torch.equal(started["model"][name], tensor), name
        assert torch.equal(started["averaged"][f"module.{name}"], tensor), name  # the average starts there too
    resumed = train_cli([*command, "trainer.max_steps=2"], tmp_path)
    assert f"Resuming from {run_dir}/checkpoints/last.pt at step 1 (its own checkpoint: trainer.init_from=" \
        in resumed.stdout and "trainer.init_from: loaded" not in resumed.stdout


@pytest.mark.slow
def test_init_from_refuses_another_shape(lm_run, tmp_path, tiny_lm, train_cli, one_line_error):
    result = train_cli([*tiny_lm, f"hydra.run.dir={tmp_path / 'wider'}", f"trainer.init_from={lm_run[0]}",
                        "model.d_model=64", "trainer.max_steps=1"], tmp_path, check=False)  # were it not refused
    line = one_line_error(result)
    assert "model.d_model: checkpoint 128 vs config 64" in line and "trainer.init_from needs a model of the same shape" \
        in line


def test_use_options_are_typed(compose):
    cfg = compose(["trainer.eval_only=true", "trainer.eval_split=test", "trainer.init_from=outputs/run"])
    assert cfg.trainer.eval_only and cfg.trainer.eval_split.value == "test" and cfg.trainer.init_from == "outputs/run"
    assert compose([]).trainer.init_from is None
    with pytest.raises(Exception) as refused:
        compose(["trainer.eval_split=train"])
    assert "expected one of [valid, test, both]" in str(refused.value.__cause__)  # the choices are listed
