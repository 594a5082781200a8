"""The fused SM3 step: one pass over (grad, param[, momentum]) per parameter.

CPU: a C++/OpenMP kernel (``sm3/csrc/sm3_fused.cpp``) built on first use with
``torch.utils.cpp_extension.load`` and cached in torch's extension directory under a name
keyed by the source's content, so it is compiled once per machine for all copies. CUDA: a Triton kernel (``sm3/_triton.py``), compiled by Triton once
per dtype combination. Both sit behind one custom op, ``sm3::fused_step_``, so that
``torch.compile`` traces ``optimizer.step()`` without graph breaks. The learning rate and the
other hyperparameters are runtime arguments: changing them never triggers a rebuild.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sm3._hyperparams import Hyperparams

_CSRC = Path(__file__).parent / "csrc"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_native = None
_native_failed = False


def _cpu_tag() -> str:
    """A short fingerprint of this CPU: the kernel is built with -march=native."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:10]


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # GCC keeps to 256-bit vectors on AVX-512 CPUs unless told: 512 measured ~15% faster
        # on a Sapphire Rapids core (no effect on CPUs without AVX-512).
        flags.append("-mprefer-vector-width=512")
    return flags


def _extension_name(source: bytes, flags: list[str], prefix: str = "sm3_fused_cpu") -> str:
    """The extension's name, and so its build directory, from what the binary depends on: this
    CPU, the source's content, the flags, torch and Python. Never the source's path: every
    checkout and installed copy on a machine shares one build (keyed by path, each rebuilt it
    when another had run, ~40 s)."""
    key = b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode(),
                      sys.implementation.cache_tag.encode()])
    return f"{prefix}_{_cpu_tag()}_{hashlib.sha1(key).hexdigest()[:10]}"


class _NoCudaNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found, using CUDA_HOME=..."
    warning: the CPU kernel needs no CUDA, and on a CPU-only machine that line read like an error on every
    run. Only that record is dropped; compiler errors are raised by ``load``, not logged here."""
    if "torch.utils.cpp_extension" not in sys.modules:
        log, notice = logging.getLogger("torch.utils.cpp_extension"), _NoCudaNotice()
        log.addFilter(notice)
        try:
            import torch.utils.cpp_extension  # noqa: F401
        finally:
            log.removeFilter(notice)
    return sys.modules["torch.utils.cpp_extension"]


def _import_built(name: str):
    """The extension ``name`` if it is already built, imported without asking the compiler
    (``load`` would check, and rebuild, against this copy's paths), else None."""
    cpp_extension = _cpp_extension()

    library = Path(cpp_extension._get_build_directory(name, False)) / f"{name}{cpp_extension.LIB_EXT}"
    if not library.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:  # being written by a build in another process: load() waits for it
        return None
    return module


def native_extension():
    """The compiled CPU kernel module, or None (with one warning) when it cannot be built."""
    global _native, _native_failed
    if _native is None and not _native_failed:
        try:
            if os.environ.get("SM3_DISABLE_NATIVE"):
                raise RuntimeError("SM3_DISABLE_NATIVE is set")
            cpp_extension = _cpp_extension()

            source, flags = _CSRC / "sm3_fused.cpp", _flags()
            name = _extension_name(source.read_bytes(), flags)
            _native = _import_built(name) or cpp_extension.load(
                name=name,
                sources=[str(source)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # no compiler, no headers, a failed build
            _native_failed = True
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(
                f"SM3: the fused CPU kernel could not be built ({reason[:200]}); "
                "using the default (unfused) path",
                RuntimeWarning,
                stacklevel=2,
            )
    return _native


def _constant_result(fn):
    # What torch.compiler.assume_constant_result does (it sets this flag on the function), without
    # importing torch._dynamo when sm3 is imported: that import measured 2-5 s of every process's start.
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def native_available() -> bool:
    return native_extension() is not None


@_constant_result
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(p: Tensor, grad: Tensor, momentum_dtype: torch.dtype | None) -> bool:
    """Whether the fused kernel can step this parameter; otherwise the default path does."""
    if grad.is_sparse or p.dtype not in _DTYPES or grad.dtype != p.dtype or not p.is_contiguous():
        return False
    if momentum_dtype is not None and momentum_dtype not in _DTYPES:
        return False
    if p.device.type == "cpu":
        return native_available()
    if p.device.type == "cuda":
        return triton_available()
    return False


def fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[Tensor],
    momentum_buffers: list[Tensor],
    hyper: Hyperparams,
) -> None:
    """The fused step for parameters on one device: through the custom op while torch.compile
    traces (one node of the graph), and straight to the kernel in eager mode, where the op's
    dispatch measured ~1.5 ms a step for the 257 tensors of a Transformer-base."""
    if torch.compiler.is_compiling():
        fused_step_(params, grads, accumulators, momentum_buffers, _lr_tensor(hyper.lr), hyper.momentum,
                    hyper.beta, hyper.eps, hyper.weight_decay, hyper.maximize)
    else:
        _launch(params, grads, accumulators, momentum_buffers, hyper._replace(lr=float(hyper.lr)))


def _lr_tensor(lr: float | Tensor) -> Tensor:
    # A float lr would be baked into a compiled graph as a constant; multiplying it into a
    # tensor lets torch.compile keep it a runtime input (dynamic after its first change).
    if isinstance(lr, Tensor):
        return lr
    return torch.ones((), dtype=torch.float64) * lr


def _launch(params, grads, accumulators, momentum_buffers, hyper: Hyperparams) -> None:
    if not params:
        return
    grads = [g.contiguous() for g in grads]
    if params[0].device.type == "cuda":
        from sm3 import _triton

        _triton.fused_step(params, grads, accumulators, momentum_buffers, hyper)
    else:  # the C++ function takes the hyperparameters flat, in the record's order
        native_extension().fused_step(params, grads, accumulators, momentum_buffers, *hyper)


@torch.library.custom_op(
    "sm3::fused_step_", mutates_args=("params", "accumulators", "momentum_buffers")
)
def fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One SM3 step for parameters on one device. ``accumulators`` lists, parameter after
    parameter, ``accumulator`` (rank <= 1) or ``accumulator_0 .. accumulator_{k-1}``;
    ``momentum_buffers`` is empty (momentum 0) or has one buffer per parameter. ``lr`` is a
    one-element tensor: a float argument would be a constant of the compiled graph, and every
    learning-rate change would recompile it. The schema is typed, so the hyperparameters are
    flat here (a custom op cannot take a ``Hyperparams``)."""
    _launch(params, grads, accumulators, momentum_buffers,
            Hyperparams(float(lr), momentum, beta, eps, weight_decay, maximize))


@fused_step_.register_fake
def _(params, grads, accumulators, momentum_buffers, lr, momentum, beta, eps, weight_decay, maximize):
    return None
