"""The multi-tensor Triton step (``sm3._triton.fused_step``) under the Triton interpreter on CPU:
many mixed parameters in one call against ``SM3(fused=False)``, and a launch count that does not
grow with the number of parameters."""

import textwrap

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

    # Rank 0, 1, 2; blocks and tiles (2048; 16 x 256) that do not divide the shape; empty
    # tensors; n_cols or n % 16 == 0 (aligned kernels) and misaligned views; two dtypes.
    SHAPES = [(), (1,), (7,), (2100,), (0,), (0, 5), (1, 1), (3, 4), (37, 300), (17, 257),
              (20, 32), "misaligned", (5,), (33, 16), (48,)]
    DTYPES = [torch.float32, torch.bfloat16]

    def make(gen, copies=1):
        params = []
        for _ in range(copies):
            for dtype in DTYPES:
                for shape in SHAPES:
                    if shape == "misaligned":
                        for s in [(9,), (3, 32)]:
                            p = misaligned(s, dtype)
                            p.copy_(torch.randn(s, generator=gen))
                            params.append(p)
                    else:
                        params.append(torch.randn(shape, generator=gen).to(dtype))
        return params

    HPARAMS = [
        dict(momentum=0.0, beta=0.0, weight_decay=0.0, maximize=False),
        dict(momentum=0.9, beta=0.0, weight_decay=0.01, maximize=False),
        dict(momentum=0.0, beta=0.5, weight_decay=0.0, maximize=True),
        dict(momentum=0.9, beta=0.5, weight_decay=0.1, maximize=True),
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
            # Groups: (rank 2 or 0/1) x 2 dtypes x (aligned or not), whatever the count.
            assert 0 < len(launches) <= 8, len(launches)
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
    assert counts[0] == counts[1] == 8, counts
    print("triton-multi-ok", counts)
    """
)


def test_one_call_steps_many_mixed_parameters_with_constant_launches(triton_interpreter):
    result = triton_interpreter(_CHECK)
    assert result.returncode == 0 and "triton-multi-ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:])
