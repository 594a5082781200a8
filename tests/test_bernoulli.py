"""The exact dropout-mask kernel (trainer/bernoulli.py) against torch's own CPU ``bernoulli_(p)``: the same
masks, the same generator state afterwards, the same errors, and a training step's losses unchanged."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from trainer import bernoulli

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert bernoulli.enable(), "the kernel did not build or did not agree with torch's on its own check"
    yield
    bernoulli.enable()  # train.py leaves it on: so does this module


def draw(fast: bool, shape, dtype, p, seed, transpose=False):
    """A mask and the generator's state after it, with the kernel or torch's."""
    (bernoulli.enable if fast else bernoulli.disable)()
    generator = torch.Generator().manual_seed(seed)
    torch.rand(seed % 7, generator=generator)  # a generator part-way through its 624-word block
    out = torch.empty(shape, dtype=dtype)
    out = out.t() if transpose else out
    out.bernoulli_(p, generator=generator)
    return out, generator.get_state()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       p=st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.1, 1 / 3, 2**-40, 1 - 2**-52]), st.floats(0, 1)))
def test_the_kernel_draws_torchs_masks_and_leaves_the_generator_where_torch_does(n, dtype, seed, p):
    expected, expected_state = draw(False, (n,), dtype, p, seed)
    got, state = draw(True, (n,), dtype, p, seed)
    assert torch.equal(got, expected)
    assert torch.equal(state, expected_state)


@pytest.mark.parametrize("shape", [(7, 130), (624, 2), (3, 5, 1250)])
def test_the_default_generator_and_shapes_across_refills(shape):
    results = []
    for fast in (False, True):
        (bernoulli.enable if fast else bernoulli.disable)()
        torch.manual_seed(3)
        mask = torch.empty(shape).bernoulli_(0.9)
        results.append((mask, torch.get_rng_state(), torch.rand(4)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_non_contiguous_tensor_goes_to_torchs_kernel():
    expected, expected_state = draw(False, (40, 30), torch.float32, 0.7, 5, transpose=True)
    got, state = draw(True, (40, 30), torch.float32, 0.7, 5, transpose=True)
    assert torch.equal(got, expected) and torch.equal(state, expected_state)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_a_dtype_torch_cannot_draw_raises_torchs_error(dtype):
    bernoulli.disable()
    with pytest.raises(Exception) as torchs:
        torch.empty(5, dtype=dtype).bernoulli_(0.5)
    bernoulli.enable()
    with pytest.raises(type(torchs.value), match=re.escape(str(torchs.value).splitlines()[0])):
        torch.empty(5, dtype=dtype).bernoulli_(0.5)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_a_probability_outside_0_1_raises_torchs_error(p):
    bernoulli.enable()
    with pytest.raises(RuntimeError, match="bernoulli_ expects p to be in"):
        torch.empty(5).bernoulli_(p)


def test_training_steps_as_the_studys_record_took_them_and_as_now_give_the_same_numbers(tmp_path, tiny):
    """torch's masks and the discarded log-likelihood (the record's runs) against the kernel's masks and none."""
    from scripts.bench_study_step import Runner

    runs = {record: Runner([*tiny, "model.dropout=0.3"], tmp_path / str(record)) for record in (True, False)}
    for _ in range(2):
        for record, runner in runs.items():
            runner.steps(2, record)
    assert runs[False].losses == runs[True].losses
    weights = [dict(r.run.model.named_parameters()) for r in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_enable_keeps_torchs_kernel_when_the_kernel_draws_differently(monkeypatch):
    draws = iter([([torch.zeros(3)], torch.zeros(2)), ([torch.ones(3)], torch.zeros(2))])
    monkeypatch.setattr(bernoulli, "_draws", lambda seed: next(draws))
    monkeypatch.setattr(bernoulli, "_agreed", None)  # check again
    with pytest.warns(RuntimeWarning, match="draws differently"):
        assert not bernoulli.enable()
    assert not bernoulli.enable()  # checked once: no second warning, still torch's
