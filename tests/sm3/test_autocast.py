"""SM3 inside a bf16 autocast training step (trainer.precision=bf16, or auto where it picks bf16): the
model's matmuls run in bfloat16, but parameters, gradients and SM3's statistics stay float32, and the
fused kernel's step equals the reference's on those gradients."""

import pytest
import torch

from reference_sm3 import ReferenceSM3
from sm3 import SM3, _fused


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_sm3_under_bf16_autocast_matches_the_reference(momentum):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.LayerNorm(40),
                                torch.nn.Linear(40, 8))
    params = list(model.parameters())
    optimizer = SM3(params, lr=0.05, momentum=momentum, fused=True)
    reference = ReferenceSM3(lr=0.05, momentum=momentum)
    x = torch.randn(16, 24)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16  # autocast is on: the matmuls ran in bfloat16
            loss = out.float().pow(2).mean()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in params)
        assert all(_fused.supports(p, p.grad, None) for p in params)  # the fused kernel takes them
        expected = [reference.step(i, p.detach(), p.grad) for i, p in enumerate(params)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i, (p, want) in enumerate(zip(params, expected)):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
            state = optimizer.state[p]
            accumulators = [state[k] for k in sorted(state) if k.startswith("accumulator")]
            assert accumulators and all(a.dtype == torch.float32 for a in accumulators)
            for got, ref in zip(accumulators, reference.accumulators(i)):
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
