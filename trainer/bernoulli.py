"""Dropout masks on the CPU as torch draws them, ~10x faster: ``trainer/csrc/bernoulli.cpp``.

torch's CPU ``Tensor.bernoulli_(p)``, which every dropout layer (and attention's dropout) calls for
its mask, draws one element at a time. On one core it was about a fifth of the study's training step
(docs/bench_study_step.md). ``enable()`` builds the kernel (once per machine and torch, cached like
sm3's fused kernel), checks on this torch that it gives torch's own masks and leaves the generator
where torch's leaves it, and only then routes ``aten::bernoulli_.float`` on CPU to it: a run gives
the same numbers either way, sooner. ``SM3_DISABLE_NATIVE=1`` keeps torch's kernel.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "bernoulli.cpp"
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512"]
_loaded: bool | None = None  # None: not tried yet
_agreed: bool | None = None  # None: not checked yet
_on = False  # whether CPU bernoulli_(p) goes to the kernel now


def _load() -> bool:
    """Build (or find built) and load the kernel's library; False, with one warning, where it cannot be."""
    global _loaded
    if _loaded is None:
        from sm3._fused import _cpp_extension, _extension_name

        try:
            if os.environ.get("SM3_DISABLE_NATIVE"):
                raise RuntimeError("SM3_DISABLE_NATIVE is set")
            cpp_extension = _cpp_extension()
            name = _extension_name(_SOURCE.read_bytes(), _FLAGS, prefix="fast_bernoulli")
            library = Path(cpp_extension._get_build_directory(name, False)) / f"{name}{cpp_extension.LIB_EXT}"
            try:  # built before: no compiler check
                torch.ops.load_library(library)
            except OSError:  # not built, or being written by another process's build: load() builds or waits
                cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, is_python_module=False,
                                   verbose=False)
            _loaded = True
        except Exception as error:  # no compiler, no headers, a failed build
            _loaded = False
            if not os.environ.get("SM3_DISABLE_NATIVE"):
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                warnings.warn(f"the CPU dropout-mask kernel could not be built ({reason[:200]}); using torch's",
                              RuntimeWarning, stacklevel=3)
    return _loaded


def _set(on: bool) -> bool:
    global _on
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        _on = torch.ops.fast_bernoulli.set_enabled(on)
    return _on


def _draws(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Masks of sizes either side of the generator's 624-word refills, and the generator's state after."""
    generator = torch.Generator().manual_seed(seed)
    masks = [torch.empty(n, dtype=dtype).bernoulli_(p, generator=generator)
             for n, dtype, p in [(1, torch.float32, 0.9), (623, torch.bfloat16, 0.5), (1249, torch.float32, 0.1),
                                 (5000, torch.float16, 0.9), (3, torch.float64, 1 / 3)]]
    return masks, generator.get_state()


def _agrees() -> bool:
    """Whether the kernel draws what torch's kernel draws, on this torch (checked once a process)."""
    global _agreed
    if _agreed is None:
        _set(False)
        expected = _draws(1234)
        _set(True)
        got = _draws(1234)
        _set(False)
        _agreed = all(torch.equal(a, b) for a, b in zip(expected[0] + [expected[1]], got[0] + [got[1]]))
        if not _agreed:
            warnings.warn(f"the CPU dropout-mask kernel draws differently from torch {torch.__version__}'s; using "
                          "torch's", RuntimeWarning, stacklevel=3)
    return _agreed


def enable() -> bool:
    """Route CPU ``bernoulli_(p)`` to the kernel, if it builds and agrees with torch's here; whether it does."""
    return _load() and _agrees() and _set(True)


def enabled() -> bool:
    """Whether CPU ``bernoulli_(p)`` goes to the kernel now."""
    return _on


def disable() -> None:
    """torch's own kernel again."""
    if _loaded:
        _set(False)
