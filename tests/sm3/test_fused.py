"""The fused SM3 step (C++/OpenMP on CPU, Triton on CUDA) against the default path and the
reference: numbers, state layout, fallbacks, and no recompilation under torch.compile."""

import os
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from sm3 import SM3, _fused
from reference_sm3 import ReferenceSM3

pytestmark = pytest.mark.skipif(not _fused.native_available(), reason="the CPU kernel did not build")

SHAPES = [(), (7,), (5, 3), (4, 3, 2), (3, 2, 2, 2), (2, 1, 70), (64, 300)]
HPARAMS = [
    dict(momentum=0.0, beta=0.0),
    dict(momentum=0.9, beta=0.0, weight_decay=0.01),
    dict(momentum=0.0, beta=0.5, maximize=True),
    dict(momentum=0.9, beta=0.5, weight_decay=0.1, maximize=True),
]


def _twins(shape, dtype, steps=4, seed=None, **hparams):
    """The same run through the fused and the default path, and through the reference."""
    if seed is None:
        seed = zlib.crc32(repr((shape, sorted(hparams.items()))).encode())
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=gen).to(dtype)
    fused, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_fused, opt_plain = SM3([fused], fused=True, **hparams), SM3([plain], fused=False, **hparams)
    ref = ReferenceSM3(**{k: v for k, v in hparams.items() if k != "momentum_dtype"})
    expected = start.double()
    for _ in range(steps):
        g = torch.randn(shape, generator=gen).to(dtype)
        fused.grad, plain.grad = g.clone(), g.clone()
        opt_fused.step()
        opt_plain.step()
        expected = ref.step(0, expected, g.float())
    return (fused, opt_fused), (plain, opt_plain), (expected, ref)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hparams", HPARAMS, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()))
def test_fused_matches_default_path_and_reference_float32(shape, hparams):
    (p, opt), (q, opt_plain), (expected, ref) = _twins(shape, torch.float32, lr=0.1, **hparams)
    assert _fused.supports(p, torch.zeros_like(p), None)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[p].keys() == opt_plain.state[q].keys()
    for key, value in opt.state[p].items():
        assert value.dtype == opt_plain.state[q][key].dtype and value.shape == opt_plain.state[q][key].shape
        torch.testing.assert_close(value, opt_plain.state[q][key], rtol=1e-6, atol=1e-6)
    keys = ["accumulator"] if len(shape) <= 1 else [f"accumulator_{r}" for r in range(len(shape))]
    for key, want in zip(keys, ref.accumulators(0)):
        torch.testing.assert_close(opt.state[p][key].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2), (64, 300)], ids=str)
@pytest.mark.parametrize("hparams", HPARAMS[1:3], ids=["momentum", "beta"])
def test_fused_matches_default_path_bfloat16(shape, hparams):
    (p, opt), (q, opt_plain), _ = _twins(shape, torch.bfloat16, lr=0.01, **hparams)
    # Both compute in float32 and round once to bfloat16: they differ by at most one rounding.
    torch.testing.assert_close(p.detach(), q.detach(), rtol=8e-3, atol=1e-3)
    for key, value in opt.state[p].items():
        assert value.dtype == opt_plain.state[q][key].dtype
        torch.testing.assert_close(value.float(), opt_plain.state[q][key].float(), rtol=2e-2, atol=1e-3)


def test_momentum_dtype_bfloat16_in_both_paths():
    shape = (32, 48)
    fused, plain, _ = _twins(shape, torch.float32, seed=5, lr=0.01, momentum=0.9, momentum_dtype=torch.bfloat16)
    (p32, opt32), _, _ = _twins(shape, torch.float32, seed=5, lr=0.01, momentum=0.9)
    for p, opt in (fused, plain):
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert opt.state[p]["accumulator_0"].dtype == torch.float32
        torch.testing.assert_close(p.detach(), p32.detach(), rtol=1e-3, atol=1e-4)
        m, m32 = opt.state[p]["momentum_buffer"].float(), opt32.state[p32]["momentum_buffer"]
        assert (m - m32).norm() < 4e-3 * m32.norm()  # bfloat16 keeps 8 bits
    # Same float32 arithmetic, one rounding of the buffer per step: the paths agree closely.
    torch.testing.assert_close(fused[0].detach(), plain[0].detach(), rtol=1e-6, atol=1e-6)


def test_invalid_momentum_dtype():
    with pytest.raises(ValueError, match="Invalid momentum_dtype"):
        SM3([torch.nn.Parameter(torch.zeros(2))], momentum_dtype=torch.int32)


def test_fused_false_never_calls_the_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fused kernel called")

    monkeypatch.setattr(_fused, "_launch", boom)
    p = torch.nn.Parameter(torch.randn(4, 5))
    p.grad = torch.randn(4, 5)
    SM3([p], fused=False, momentum=0.9).step()
    with pytest.raises(AssertionError, match="fused kernel called"):
        SM3([p], momentum=0.9).step()  # fused=None picks the kernel on CPU


def test_fallbacks_take_the_default_path():
    # float64, non-contiguous and sparse parameters are stepped by the default path.
    assert not _fused.supports(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), None)
    t = torch.zeros(4, 6).t()
    assert not _fused.supports(t, t, None)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SM3(emb.parameters(), fused=True, lr=0.1)
    emb(torch.tensor([1, 2, 1])).sum().backward()
    before = emb.weight.detach().clone()
    opt.step()
    assert (emb.weight[[1, 2]] != before[[1, 2]]).all() and torch.equal(emb.weight[0], before[0])


def test_warns_once_and_falls_back_without_a_compiler(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error checking compiler version for c++: [Errno 2] No such file")

    monkeypatch.setattr(_fused, "_native", None)
    monkeypatch.setattr(_fused, "_native_failed", False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    p, q = torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(3, 4))
    p.grad, q.grad = torch.full((3, 4), 0.5), torch.full((3, 4), 0.5)
    with pytest.warns(RuntimeWarning, match="could not be built.*default"):
        SM3([p], fused=True, lr=0.1).step()
    SM3([q], fused=False, lr=0.1).step()
    assert torch.equal(p, q)
    assert not _fused.native_available()


def test_steps_never_rebuild_the_extension(monkeypatch):
    import torch.utils.cpp_extension

    loads = []
    real_load = torch.utils.cpp_extension.load

    def counting_load(*args, **kwargs):
        loads.append(kwargs.get("name"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", counting_load)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = SM3([p], lr=0.1, momentum=0.9)
    for i in range(10):
        p.grad = torch.randn(6, 5)
        opt.param_groups[0]["lr"] = 0.1 / (i + 1)  # runtime arguments: no rebuild
        opt.step()
    assert _fused.native_available() and loads == []


def _train_step_fn(model, opt):
    def train_step(x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


def test_torch_compile_fullgraph_train_step_without_recompiles():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SM3(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    eager = _train_step_fn(models[0], opts[0])
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_train_step_fn(models[1], opts[1]), fullgraph=True, backend="eager")
        x = torch.randn(4, 8)
        for i in range(10):
            for opt in opts:
                opt.param_groups[0]["lr"] = 0.1 / (i + 1)  # a schedule: must not recompile
            eager(x)
            compiled(x)
            for opt in opts:
                opt.zero_grad()
    # one graph for the first step (it creates the state), one for every later step
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from sm3 import _triton
    from sm3._hyperparams import Hyperparams
    from sm3.optimizer import _accumulators, _init_state
    from reference_sm3 import ReferenceSM3

    for shape in [(7,), (37, 300)]:
        for mom, beta, wd, mx in [(0.0, 0.0, 0.0, False), (0.9, 0.5, 0.1, True)]:
            for dtype, mdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]:
                gen = torch.Generator().manual_seed(0)
                p = torch.randn(shape, generator=gen).to(dtype)
                ref = ReferenceSM3(lr=0.1, momentum=mom, beta=beta, weight_decay=wd, maximize=mx)
                expected, state = p.double(), {}
                _init_state(p, state)
                buffers = [torch.zeros(shape, dtype=mdt)] if mom else []
                for _ in range(3):
                    g = torch.randn(shape, generator=gen).to(dtype)
                    _triton.fused_step([p], [g], _accumulators(p, state), buffers,
                                       Hyperparams(0.1, mom, beta, 1e-30, wd, mx))
                    expected = ref.step(0, expected, g.float())
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(p.double(), expected, rtol=tol, atol=tol)
                for a, b in zip(_accumulators(p, state), ref.accumulators(0)):
                    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    print("triton-ok")
    """
)


@pytest.mark.slow
def test_triton_kernel_under_the_interpreter(triton_interpreter):
    result = triton_interpreter(_TRITON_CHECK)
    assert result.returncode == 0 and "triton-ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_matches_default_path():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(7,), (300, 700), (4, 3, 2), (64, 3, 3, 3)]:
        start = torch.randn(shape, generator=gen, device="cuda")
        p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        a, b = SM3([p], fused=True, momentum=0.9, lr=0.1), SM3([q], fused=False, momentum=0.9, lr=0.1)
        for _ in range(3):
            g = torch.randn(shape, generator=gen, device="cuda")
            p.grad, q.grad = g.clone(), g.clone()
            a.step()
            b.step()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


_IMPORT_WITHOUT_COMPILER = textwrap.dedent(
    """
    import torch.utils.cpp_extension

    def no_build(*args, **kwargs):
        raise RuntimeError("compiled")

    torch.utils.cpp_extension.load = no_build  # any call would compile (or check the build)
    import sm3
    from sm3 import _fused

    assert sm3.__file__.startswith({copy!r}), sm3.__file__
    extension = _fused.native_extension()
    print("built:", None if extension is None else extension.__file__)
    """
)


@pytest.mark.slow
def test_copies_of_the_source_share_one_build(tmp_path, run_python):
    # Another checkout, or an installed wheel, finds the kernel that this one built (at import,
    # for pytestmark): the build is keyed by the source's content, not by its path.
    import shutil

    import sm3

    built = _fused.native_extension().__file__
    mtime = os.stat(built).st_mtime_ns
    for copy in ("a", "b"):
        shutil.copytree(Path(sm3.__file__).parent, tmp_path / copy / "sm3",
                        ignore=shutil.ignore_patterns("__pycache__"))
        result = run_python(_IMPORT_WITHOUT_COMPILER.format(copy=str(tmp_path / copy)),
                            cwd=tmp_path / copy, pythonpath=(tmp_path / copy,))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"built: {built}" in result.stdout, result.stdout + result.stderr[-3000:]
    assert os.stat(built).st_mtime_ns == mtime


@pytest.mark.slow
def test_the_cpu_kernel_says_nothing_about_cuda(run_python):
    # torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when imported on a
    # machine without CUDA: the CPU kernel needs none, so loading it must not print that.
    result = run_python("import torch\nfrom sm3 import SM3, _fused\n"
                        "p = torch.nn.Parameter(torch.ones(3, 4)); p.grad = torch.ones(3, 4)\n"
                        "SM3([p], fused=True).step()\nassert _fused.native_available()\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CUDA_HOME" not in result.stderr, result.stderr
