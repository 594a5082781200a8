"""The SM3 optimizer against the plain reference, hand-computed values and its contracts."""

import copy
import io
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sm3.optimizer
from sm3 import SM3, optimizer_state_bytes
from reference_sm3 import ReferenceSM3

SHAPES = [(), (7,), (5, 3), (4, 3, 2), (3, 2, 2, 2), (300, 700), (200, 30, 20), (2, 70000)]


def _random_grad(shape, generator, zero_fraction=0.2):
    g = torch.randn(shape, generator=generator)
    return g * (torch.rand(shape, generator=generator) > zero_fraction)  # exact zeros too


def _run_against_reference(shape, steps=4, dtype=torch.float32, fused=None, **hparams):
    gen = torch.Generator().manual_seed(hash((shape, tuple(sorted(hparams.items())))) % 2**31)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = SM3([p], fused=fused, **hparams)
    ref = ReferenceSM3(**hparams)
    expected = p.detach().double()
    for _ in range(steps):
        g = _random_grad(shape, gen)
        p.grad = g.to(dtype)
        opt.step()
        expected = ref.step(0, expected, g)
    return p, opt, ref, expected


@pytest.mark.parametrize("fused", [False, None], ids=["default", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5), (0.9, 0.95)])
def test_dense_matches_reference(shape, momentum, beta, fused):
    p, opt, ref, expected = _run_against_reference(shape, momentum=momentum, beta=beta, lr=0.1, fused=fused)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    state = opt.state[p]
    keys = ["accumulator"] if len(shape) <= 1 else [f"accumulator_{r}" for r in range(len(shape))]
    for key, want in zip(keys, ref.accumulators(0)):
        assert state[key].shape == want.shape
        torch.testing.assert_close(state[key].double(), want, rtol=1e-5, atol=1e-7)
    assert ("momentum_buffer" in state) == (momentum > 0)
    assert state["step"].item() == 4


@pytest.mark.parametrize("one_pass", [True, False], ids=["fused_adagrad", "plain_ops"])
@pytest.mark.parametrize("shape", [(301, 70), (45, 6, 5), (7, 3), (2500,)], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_default_path_in_many_chunks_matches_reference(shape, threads, one_pass, monkeypatch):
    # Small chunks: several per parameter, a last one whose rows do not divide among the
    # threads, and per-thread column maxima merged across chunks; with torch's fused Adagrad
    # kernel doing the one pass, and without it (torch builds that lack it).
    monkeypatch.setattr(sm3.optimizer, "_CHUNK_ELEMENTS", 1000)
    if not one_pass:
        monkeypatch.setattr(sm3.optimizer, "_fused_adagrad_", None)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hparams = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
        p, opt, ref, expected = _run_against_reference(shape, fused=False, **hparams)
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    keys = ["accumulator"] if len(shape) <= 1 else [f"accumulator_{r}" for r in range(len(shape))]
    for key, want in zip(keys, ref.accumulators(0)):
        torch.testing.assert_close(opt.state[p][key].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [False, None], ids=["default", "fused"])
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)], ids=str)
def test_empty_parameters_step(shape, fused):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SM3([p], fused=fused, momentum=0.9)
    for _ in range(2):
        p.grad = torch.zeros(shape)
        opt.step()
    assert opt.state[p]["step"].item() == 2
    sizes = [shape[0] if shape else 1] if len(shape) <= 1 else list(shape)
    assert [a.numel() for k, a in sorted(opt.state[p].items()) if k.startswith("accumulator")] == sizes


@pytest.mark.parametrize("fused", [False, None], ids=["default", "fused"])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2)], ids=str)
@pytest.mark.parametrize("weight_decay,maximize", [(0.01, False), (0.0, True), (0.1, True)])
def test_weight_decay_and_maximize_match_reference(shape, weight_decay, maximize, momentum, fused):
    hparams = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    p, _, _, expected = _run_against_reference(shape, fused=fused, **hparams)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_hand_computed_two_steps():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = SM3([p], lr=1.0)
    p.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    opt.step()
    # nu = g^2 = [[1, 4], [9, 16]]: u = sign(g); rows max [4, 16], columns max [9, 16]
    torch.testing.assert_close(p.detach(), -torch.ones(2, 2))
    torch.testing.assert_close(opt.state[p]["accumulator_0"], torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(opt.state[p]["accumulator_1"], torch.tensor([9.0, 16.0]))
    p.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    opt.step()
    # min(row_i, col_j) = [[4, 4], [9, 16]]; + g^2 = [[5, 4], [9, 17]]
    want = torch.tensor([[-1 - 1 / math.sqrt(5), -1.0], [-1.0, -1 - 1 / math.sqrt(17)]])
    torch.testing.assert_close(p.detach(), want)
    torch.testing.assert_close(opt.state[p]["accumulator_0"], torch.tensor([5.0, 17.0]))
    torch.testing.assert_close(opt.state[p]["accumulator_1"], torch.tensor([9.0, 17.0]))


def test_beta_lets_accumulators_fall():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = SM3([p], lr=0.1, beta=0.5)
    p.grad = torch.full((2, 3), 2.0)
    opt.step()
    torch.testing.assert_close(opt.state[p]["accumulator_0"], torch.tensor([2.0, 2.0]))  # 0.5 * 4
    p.grad = torch.zeros(2, 3)
    opt.step()
    torch.testing.assert_close(opt.state[p]["accumulator_0"], torch.tensor([1.0, 1.0]))  # decays, no running max


def test_momentum_zero_allocates_no_buffer_and_state_is_tiny():
    p = torch.nn.Parameter(torch.zeros(1024, 512))
    p.grad = torch.randn(1024, 512)
    sm3 = SM3([p])
    sm3.step()
    assert set(sm3.state[p]) == {"step", "accumulator_0", "accumulator_1"}
    adam = torch.optim.Adam([p])
    adam.step()
    assert optimizer_state_bytes(sm3) == (1024 + 512) * 4 + 4
    assert optimizer_state_bytes(sm3) < 0.005 * optimizer_state_bytes(adam)


def test_param_groups_differ_in_every_hyperparameter():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    groups = [
        dict(params=[a], lr=0.2, momentum=0.9, beta=0.0, weight_decay=0.01),
        dict(params=[b], lr=0.05, momentum=0.0, beta=0.9, maximize=True, eps=1e-8),
    ]
    refs = [ReferenceSM3(**{k: v for k, v in g.items() if k != "params"}) for g in groups]
    opt = SM3(groups)
    expected = [a.detach().double(), b.detach().double()]
    for _ in range(3):
        grads = [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)]
        for p, g in zip((a, b), grads):
            p.grad = g
        opt.step()
        expected = [ref.step(0, e, g) for ref, e, g in zip(refs, expected, grads)]
    torch.testing.assert_close(a.detach().double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), expected[1], rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    opt = SM3(model.parameters(), momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, before)
    assert model[0].weight not in opt.state
    assert model[1].weight in opt.state


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SM3([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert (p < 1).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(lr=-0.1), "lr"), (dict(eps=-1.0), "eps"), (dict(momentum=1.0), "momentum"),
     (dict(momentum=-0.1), "momentum"), (dict(beta=1.0), "beta"), (dict(beta=-0.5), "beta"),
     (dict(weight_decay=-1.0), "weight_decay")],
)
def test_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: {list(kwargs.values())[0]}"):
        SM3([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        SM3([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


# --- sparse gradients -------------------------------------------------------------------


def test_sparse_matches_reference_with_duplicate_indices():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(10, 4, generator=gen))
    opt = SM3([p], lr=0.1, momentum=0.9)  # momentum is not applied to sparse updates
    ref = ReferenceSM3(lr=0.1)
    expected = p.detach().double()
    for _ in range(3):
        indices = torch.tensor([3, 1, 3, 7, 3])
        values = torch.randn(5, 4, generator=gen)
        p.grad = torch.sparse_coo_tensor(indices[None], values, (10, 4))  # uncoalesced
        opt.step()
        expected = ref.sparse_step(0, expected, indices, values)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["accumulator_0"].double(), ref.accumulators(0)[0])
    assert "momentum_buffer" not in opt.state[p]
    untouched = [0, 2, 4, 5, 6, 8, 9]
    assert (opt.state[p]["accumulator_0"][untouched] == 0).all()


def test_rank1_sparse_gradient():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = SM3([p], lr=1.0)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 1]]), torch.tensor([1.0, -2.0, 2.0]), (6,))
    opt.step()
    # index 1: g = 3, nu = 9, update 1; index 4: g = -2, nu = 4, update -1
    torch.testing.assert_close(p.detach(), torch.tensor([0.0, -1.0, 0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(opt.state[p]["accumulator"], torch.tensor([0.0, 9.0, 0.0, 0.0, 4.0, 0.0]))


def test_sparse_embedding_trains():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    head = torch.nn.Linear(8, 50)
    opt = SM3(list(emb.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    tokens = torch.randint(0, 50, (64,))
    target = (tokens + 1) % 50
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(emb(tokens)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    unused = sorted(set(range(50)) - set(tokens.tolist()))
    assert (opt.state[emb.weight]["accumulator_0"][unused] == 0).all()


# --- precision and state ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_zero_rows_stay_finite(dtype):
    p = torch.nn.Parameter(torch.randn(8, 16).to(dtype))
    opt = SM3([p], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(8, 16)
        g[2] = 0  # a row and a column that never see a gradient
        g[:, 5] = 0
        p.grad = g.to(dtype)
        before = p.detach().clone()
        opt.step()
        assert torch.isfinite(p).all()
        assert torch.equal(p[2], before[2])
    assert opt.state[p]["accumulator_0"].dtype == torch.float32
    assert opt.state[p]["accumulator_0"][2] == 0


def test_half_precision_follows_float32():
    gen = torch.Generator().manual_seed(3)
    p32 = torch.nn.Parameter(torch.randn(16, 8, generator=gen))
    pbf = torch.nn.Parameter(p32.detach().to(torch.bfloat16))
    opt32, optbf = SM3([p32], lr=0.01), SM3([pbf], lr=0.01)
    g = torch.randn(16, 8, generator=gen).to(torch.bfloat16).float()
    p32.grad, pbf.grad = g, g.to(torch.bfloat16)
    opt32.step(), optbf.step()
    torch.testing.assert_close(pbf.float(), p32.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    gen = torch.Generator().manual_seed(4)
    shapes = [(6, 5), (5,), (3, 2, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = SM3(params, lr=0.1, momentum=0.9, beta=0.5)
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(6)]

    def run(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()

    run(opt, params, grads[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clones = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    fresh = SM3(clones, lr=0.1, momentum=0.9, beta=0.5)
    fresh.load_state_dict(saved["optim"])
    assert fresh.state[clones[0]]["accumulator_0"].dtype == torch.float32
    run(opt, params, grads[3:])
    run(fresh, clones, grads[3:])
    for a, b in zip(params, clones):
        assert torch.equal(a, b)
    for a, b in zip(params, clones):
        for key, value in opt.state[a].items():
            assert torch.equal(value, fresh.state[b][key]), key


# --- properties -------------------------------------------------------------------------

finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_accumulators_upper_bound_sum_of_squares(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SM3([p], lr=0.01)
    total = torch.zeros(shape)
    for _ in range(steps):
        g = torch.randn(shape, generator=gen) * 3
        p.grad = g
        opt.step()
        total += g * g
    for r in range(len(shape)):
        acc = opt.state[p][f"accumulator_{r}"]
        covered = acc.reshape([-1 if d == r else 1 for d in range(len(shape))]).expand(shape)
        assert (covered >= total * (1 - 1e-6)).all()


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.lists(finite.filter(lambda x: abs(x) > 1e-3), min_size=5, max_size=5), min_size=1, max_size=5
    ),
    lr=st.floats(1e-3, 1.0),
)
def test_rank1_matches_adagrad(values, lr):
    p1 = torch.nn.Parameter(torch.zeros(5))
    p2 = torch.nn.Parameter(torch.zeros(5))
    sm3 = SM3([p1], lr=lr)
    adagrad = torch.optim.Adagrad([p2], lr=lr, lr_decay=0, initial_accumulator_value=0, eps=0)
    for row in values:
        g = torch.tensor(row)
        p1.grad, p2.grad = g.clone(), g.clone()
        sm3.step()
        adagrad.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-5, atol=1e-6)


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    import sm3

    assert sm3.__version__ == version("sm3")


# --- state dicts of older versions and of the earlier PyTorch port -----------------------


def _earlier_port_state_dict(params, accumulators, buffers, step):
    """A state dict in the earlier PyTorch SM3 port's layout: groups with only lr, momentum,
    beta and eps; ``step`` a Python int; ``accumulator_r`` shaped to broadcast along dimension
    r (``accumulator_0`` alone for rank <= 1); ``momentum_buffer`` 0. before its first use."""
    state = {}
    for i, (p, accs, buf) in enumerate(zip(params, accumulators, buffers)):
        entry = {"step": step, "momentum_buffer": 0.0 if buf is None else buf.clone()}
        for r, a in enumerate(accs):
            shape = [n if d == r else 1 for d, n in enumerate(p.shape)] if p.dim() > 1 else p.shape
            entry[f"accumulator_{r}"] = a.clone().reshape(shape)
        state[i] = entry
    groups = [{"lr": 0.1, "momentum": 0.9, "beta": 0.0, "eps": 1e-30, "params": list(range(len(params)))}]
    return {"state": state, "param_groups": groups}


def test_loads_the_earlier_port_layout_and_continues_as_our_own():
    gen = torch.Generator().manual_seed(11)
    shapes = [(6, 5), (3, 2, 4), (5,), ()]
    start = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    opt = SM3(ours, lr=0.1, momentum=0.9)
    for _ in range(2):
        for p in ours:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    accumulators = [[opt.state[p][k] for k in sorted(opt.state[p]) if k.startswith("accumulator")] for p in ours]
    buffers = [opt.state[p]["momentum_buffer"] for p in ours]
    buffers[-1] = None  # the port's 0. placeholder: a zero buffer
    opt.state[ours[-1]]["momentum_buffer"].zero_()
    old = _earlier_port_state_dict(ours, accumulators, buffers, step=2)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    loaded = SM3(theirs, lr=0.5, momentum=0.5, weight_decay=0.3, maximize=True)
    loaded.load_state_dict(old)
    group = loaded.param_groups[0]
    assert (group["weight_decay"], group["maximize"], group["fused"], group["foreach"], group["momentum_dtype"]) == (
        0.0, False, None, None, None)
    for p, q in zip(ours, theirs):
        assert loaded.state[q].keys() | {"momentum_buffer"} == opt.state[p].keys()  # 0.: none yet
        assert loaded.state[q]["step"].dtype == torch.float32
    for _ in range(2):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        loaded.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q) and loaded.state[q].keys() == opt.state[p].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, loaded.state[q][key]), key


def test_loads_the_earlier_port_sparse_layout():
    # A sparse (embedding) gradient kept only accumulator_0 of shape (n,): the others start at 0.
    p = torch.nn.Parameter(torch.randn(4, 3))
    old = {"state": {0: {"step": 1, "momentum_buffer": 0.0, "accumulator_0": torch.rand(4)}},
           "param_groups": [{"lr": 0.1, "momentum": 0.0, "beta": 0.0, "eps": 1e-30, "params": [0]}]}
    opt = SM3([p])
    opt.load_state_dict(old)
    assert opt.state[p]["accumulator_1"].shape == (3,) and not opt.state[p]["accumulator_1"].any()
    p.grad = torch.randn(4, 3)
    opt.step()
    assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("missing", ["maximize", "weight_decay", "fused", "momentum_dtype", "foreach"])
def test_param_group_saved_before_a_key_existed_loads_and_steps(missing):
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    opt = SM3([p], momentum=0.9)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][0][missing]
    saved["state"][0]["step"] = 1  # torch's old format: a Python number
    q = torch.nn.Parameter(p.detach().clone())
    fresh = SM3([q], momentum=0.9)
    fresh.load_state_dict(saved)
    q.grad, p.grad = p.grad.clone(), p.grad.clone()
    fresh.step()
    opt.step()
    assert torch.equal(p, q) and fresh.state[q]["step"].item() == 2


def test_tensor_lr_of_the_wrong_size_uses_torch_wording():
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        SM3([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor([0.1, 0.2]))
