"""The multi-tensor Triton step (``sm3._triton.fused_step``) under the Triton interpreter on CPU:
many mixed parameters of rank 0 to 4 in one call against ``SM3(fused=False)``, a launch count that
does not grow with the number of parameters, rank 3 against the reference, and the optimizer's
dispatch of rank >= 3 parameters (the order of their accumulators) into the kernels."""

import textwrap

import pytest

pytestmark = pytest.mark.slow  # each test runs the Triton interpreter in a fresh interpreter (15-35 s here)

_CHECK = textwrap.dedent(
    """
    import torch
    from sm3 import SM3, _triton
    from sm3._hyperparams import Hyperparams
    from sm3.optimizer import _accumulators, _init_state

    launches = []

    class Counting:
        # Stands in for a kernel: counts launches, then runs the real one.
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel)
            return self.kernel[grid]

    _triton._factored_kernel = Counting(_triton._factored_kernel)
    _triton._diagonal_kernel = Counting(_triton._diagonal_kernel)

    def misaligned(shape, dtype):
        # A contiguous view one element into its storage: takes the unaligned kernels.
        n = 1
        for s in shape:
            n *= s
        return torch.empty(n + 1, dtype=dtype)[1:].view(shape)

    # Rank 0 to 4; blocks and tiles (2048; 16 x 256) that do not divide the shape, tiles whose
    # columns cross the later dimensions' boundaries; dimensions of 1; empty tensors; n or
    # n_1 * ... * n_{k-1} % 16 == 0 (aligned kernels) and misaligned views; two dtypes.
    SHAPES = [(), (1,), (7,), (2100,), (0,), (0, 5), (1, 1), (3, 4), (37, 300), (17, 257),
              (20, 32), "misaligned", (5,), (33, 16), (48,),
              (3, 4, 5), (2, 1, 300), (20, 3, 130), (1, 17, 16), (0, 3, 4), (3, 0, 2),
              (2, 3, 4, 5), (17, 1, 3, 7), (1, 1, 1, 1), (4, 2, 2, 64), (2, 0, 1, 3)]
    DTYPES = [torch.float32, torch.bfloat16]

    def make(gen, copies=1):
        params = []
        for _ in range(copies):
            for dtype in DTYPES:
                for shape in SHAPES:
                    if shape == "misaligned":
                        for s in [(9,), (3, 32), (2, 3, 32)]:
                            p = misaligned(s, dtype)
                            p.copy_(torch.randn(s, generator=gen))
                            params.append(p)
                    else:
                        params.append(torch.randn(shape, generator=gen).to(dtype))
        return params

    HPARAMS = [
        dict(momentum=0.0, beta=0.0, weight_decay=0.0, maximize=False),
        dict(momentum=0.9, beta=0.0, weight_decay=0.01, maximize=False),
        dict(momentum=0.0, beta=0.9, weight_decay=0.0, maximize=True),
        dict(momentum=0.9, beta=0.9, weight_decay=0.1, maximize=True),
    ]
    lr, eps = 0.1, 1e-30
    for h in HPARAMS:
        gen = torch.Generator().manual_seed(0)
        params = make(gen)
        plain = [torch.nn.Parameter(p.clone()) for p in params]
        opt = SM3(plain, lr=lr, eps=eps, fused=False, **h)
        states = [{} for _ in params]
        for p, s in zip(params, states):
            _init_state(p, s)
        buffers = [torch.zeros_like(p) for p in params] if h["momentum"] else []
        for step in range(3):
            grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
            for q, g in zip(plain, grads):
                q.grad = g.clone()
            opt.step()
            accs = [a for p, s in zip(params, states) for a in _accumulators(p, s)]
            del launches[:]
            _triton.fused_step(params, grads, accs, buffers,
                               Hyperparams(lr, h["momentum"], h["beta"], eps, h["weight_decay"], h["maximize"]))
            # Groups: (rank 0/1, 2, 3 or 4) x 2 dtypes x (aligned or not), whatever the count.
            assert 0 < len(launches) <= 16, len(launches)
            for i, (p, q) in enumerate(zip(params, plain)):
                # bfloat16: the default path rounds differently, at most about one ulp
                tol = 1e-6 if p.dtype == torch.float32 else 2e-2
                where = f"{h} step {step} param {i} {tuple(p.shape)} {p.dtype}"
                torch.testing.assert_close(p, q.detach(), rtol=tol, atol=tol,
                                           msg=lambda m: where + m)
                st = opt.state[q]
                for a, b in zip(_accumulators(p, states[i]), _accumulators(q, st)):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: where + m)
                if buffers:
                    torch.testing.assert_close(buffers[i], st["momentum_buffer"], rtol=tol,
                                               atol=tol, msg=lambda m: where + m)

    # The launch count does not grow with the number of parameters.
    counts = []
    for copies in (1, 3):
        params = make(torch.Generator().manual_seed(1), copies)
        states = [{} for _ in params]
        for p, s in zip(params, states):
            _init_state(p, s)
        accs = [a for p, s in zip(params, states) for a in _accumulators(p, s)]
        grads = [torch.randn_like(p) for p in params]
        del launches[:]
        _triton.fused_step(params, grads, accs, [], Hyperparams(lr, 0.0, 0.0, eps, 0.0, False))
        counts.append(len(launches))
    assert counts[0] == counts[1] == 16, counts
    print("triton-multi-ok", counts)
    """
)


def test_one_call_steps_many_mixed_parameters_with_constant_launches(triton_interpreter):
    result = triton_interpreter(_CHECK)
    assert result.returncode == 0 and "triton-multi-ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:])


_RANK3_CHECK = textwrap.dedent(
    """
    import torch
    from sm3 import SM3, _fused, _triton
    from sm3._hyperparams import Hyperparams
    from sm3.optimizer import _accumulators, _init_state
    from reference_sm3 import ReferenceSM3

    # Rank 3 against the plain float64 reference.
    for mom, beta, wd, mx in [(0.0, 0.0, 0.0, False), (0.9, 0.9, 0.1, True)]:
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(5, 3, 40, generator=gen)
        ref = ReferenceSM3(lr=0.1, momentum=mom, beta=beta, weight_decay=wd, maximize=mx)
        expected, state = p.double(), {}
        _init_state(p, state)
        buffers = [torch.zeros_like(p)] if mom else []
        for _ in range(3):
            g = torch.randn(p.shape, generator=gen)
            _triton.fused_step([p], [g], _accumulators(p, state), buffers,
                               Hyperparams(0.1, mom, beta, 1e-30, wd, mx))
            expected = ref.step(0, expected, g)
        torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(_accumulators(p, state), ref.accumulators(0)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)

    # Through the optimizer: SM3(fused=True) hands mixed ranks (and their accumulators, in
    # order) to the Triton step, as it does on CUDA, and matches SM3(fused=False).
    stepped = []

    def triton_launch(params, grads, accumulators, momentum_buffers, hyper):
        stepped.extend(p.dim() for p in params)
        _triton.fused_step(params, [g.contiguous() for g in grads], accumulators,
                           momentum_buffers, hyper)

    _fused.supports = lambda p, grad, momentum_dtype: not grad.is_sparse
    _fused._launch = triton_launch
    shapes = [(4, 3, 2), (6,), (2, 3, 4, 5), (5, 7), (3, 1, 33), ()]
    gen = torch.Generator().manual_seed(1)
    starts = [torch.randn(s, generator=gen) for s in shapes]
    fused = [torch.nn.Parameter(s.clone()) for s in starts]
    plain = [torch.nn.Parameter(s.clone()) for s in starts]
    hyper = dict(lr=0.1, momentum=0.9, beta=0.9, weight_decay=0.01)
    opts = SM3(fused, fused=True, **hyper), SM3(plain, fused=False, **hyper)
    for _ in range(3):
        for a, b in zip(fused, plain):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    assert sorted(stepped) == sorted(len(s) for s in shapes * 3), stepped
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for key, value in opts[0].state[a].items():
            torch.testing.assert_close(value, opts[1].state[b][key], rtol=1e-6, atol=1e-6)
    print("triton-rank3-ok")
    """
)


def test_rank3_matches_the_reference_and_the_optimizer_dispatches_it(triton_interpreter):
    result = triton_interpreter(_RANK3_CHECK)
    assert result.returncode == 0 and "triton-rank3-ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:])
