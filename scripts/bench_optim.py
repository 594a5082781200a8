"""Step time and memory of SM3 against torch.optim baselines, on Transformer parameter shapes.

Every optimizer gets its own copy of the parameters (same values) and all of them share one
set of random gradients, drawn once. After one warm-up step each, the script runs interleaved
rounds (each round steps every optimizer once, in an order rotated from round to round, so
that drifts of a shared machine hit all of them alike) and reports medians and ratios.

    uv run python scripts/bench_optim.py                       # Transformer-base, CPU
    uv run python scripts/bench_optim.py --model big --rounds 8
    uv run python scripts/bench_optim.py --out docs/bench_optim.md --plot docs/bench_optim.png
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from scripts._shapes import MODELS, TransformerSpec, model_shapes, parameter_count

from sm3 import SM3, optimizer_state_bytes

MB = 1e6
BASELINE = "Adam (foreach)"
FUSED_BASELINE = "Adam (fused)"
# The targets this benchmark is judged against: (row, baseline row, largest ratio allowed).
TIME_TARGETS = [
    ("SM3 (m=0)", BASELINE, 0.5),
    ("SM3 fused (m=0)", FUSED_BASELINE, 0.6),
    ("SM3 fused (m=0.9)", FUSED_BASELINE, 0.9),
]
STATE_TARGETS = [("SM3 (m=0)", BASELINE, 0.005)]


def sm3_revision() -> str:
    """The last commit that changed sm3/, '+dirty' when sm3/ has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", "sm3"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sm3"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def sm3_has_fused() -> bool:
    return "fused" in inspect.signature(SM3.__init__).parameters


def optimizer_factories(device: str) -> list[tuple[str, Callable]]:
    """(row label, params -> optimizer). Adagrad, Adafactor and SGD use torch's default kernels."""
    # With a `fused` argument, SM3's default (fused=None) takes the fused kernel wherever it
    # is available, so the rows of the chunked default path ask for it with fused=False.
    unfused = {"fused": False} if sm3_has_fused() else {}
    rows = [
        ("SM3 (m=0)", lambda p: SM3(p, lr=0.1, **unfused)),
        ("SM3 (m=0.9)", lambda p: SM3(p, lr=0.1, momentum=0.9, **unfused)),
    ]
    if sm3_has_fused():
        bf16 = {"momentum": 0.9, "momentum_dtype": torch.bfloat16}
        rows += [
            ("SM3 (m=0.9, bf16 buffer)", lambda p: SM3(p, lr=0.1, fused=False, **bf16)),
            ("SM3 fused (m=0)", lambda p: SM3(p, lr=0.1, fused=True)),
            ("SM3 fused (m=0.9)", lambda p: SM3(p, lr=0.1, momentum=0.9, fused=True)),
            ("SM3 fused (m=0.9, bf16 buffer)", lambda p: SM3(p, lr=0.1, fused=True, **bf16)),
        ]
    rows += [
        (BASELINE, lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True)),
        (FUSED_BASELINE, lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
        ("Adagrad", lambda p: torch.optim.Adagrad(p, lr=1e-2)),
        ("Adafactor", lambda p: torch.optim.Adafactor(p, lr=1e-2)),
        ("SGD (m=0.9)", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)),
    ]
    return rows


@dataclass
class Row:
    label: str
    optimizer: torch.optim.Optimizer | None
    one_time_ms: float = 0.0  # constructor + first step, before the median is subtracted
    step_ms: list[float] = field(default_factory=list)
    state_bytes: int = 0
    peak_extra_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def quartiles_ms(self) -> tuple[float, float]:
        if len(self.step_ms) < 2:
            return self.step_ms[0], self.step_ms[0]
        q = statistics.quantiles(self.step_ms, n=4)
        return q[0], q[2]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(optimizer: torch.optim.Optimizer, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def peak_extra_bytes(optimizer: torch.optim.Optimizer, device: str) -> int:
    """Peak memory one (steady-state) step allocates beyond what existed before it.

    CUDA: the caching allocator's peak counter, reset before the step, minus the allocated
    bytes before it. CPU: torch.profiler records every allocation and free made through
    PyTorch's allocator with its size and time; the peak of their running sum, in time order,
    is the step's transient high-water mark. Memory a native kernel takes outside PyTorch's
    allocator (std::vector, stack) is not seen by either method.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        optimizer.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    running = peak = 0
    for _, size in sorted(allocations):
        running += size
        peak = max(peak, running)
    return peak


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no mmap'ed blocks, no trimming.

    By default glibc returns large freed blocks (and the top of the heap) to the OS, so an
    optimizer that allocates temporaries every step (Adam(foreach): ~240 MB for
    Transformer-base) page-faults them in again every step: on this CPU that made its step
    1.4-3x slower and bimodal. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_max, 0))


def make_parameters(shapes, device: str, seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(device)) for _, shape in shapes
    ]


def warm_up_process(device: str) -> None:
    """Pay the process's own one-time costs (thread pools, lazy imports) before any row is
    timed, so that a row's one-time cost is its own. Uses no fused kernel: their build is
    what the fused rows measure."""
    x = torch.randn(512, 512, device=device)
    (x @ x).sum().item()
    p = torch.nn.Parameter(torch.randn(256, 512, device=device))
    p.grad = torch.randn_like(p)
    unfused = {"fused": False} if sm3_has_fused() else {}
    for optimizer in (SM3([p], **unfused), torch.optim.Adam([p], foreach=True)):
        optimizer.step()
    _sync(device)


def bench_model(spec, rounds: int, device: str, log=print) -> list[Row]:
    warm_up_process(device)
    shapes = model_shapes(spec)
    generator = torch.Generator().manual_seed(1)
    # One gradient per parameter shape, drawn once and shared by every optimizer's copy:
    # none of the optimizers writes into p.grad.
    grads = [torch.randn(shape, generator=generator).to(device) for _, shape in shapes]
    rows = []
    for label, factory in optimizer_factories(device):
        params = make_parameters(shapes, device, seed=0)
        for p, g in zip(params, grads):
            p.grad = g
        _sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            optimizer = factory(params)
            optimizer.step()  # first step: lazy state allocation, and for fused paths the kernel build
            _sync(device)
            elapsed_ms = (time.perf_counter() - start) * 1e3
        row = Row(label, optimizer, one_time_ms=elapsed_ms)
        # e.g. SM3's fused kernel failing to build: the row then ran the default path.
        row.warnings = sorted({f"{label}: {w.message}" for w in caught if issubclass(w.category, RuntimeWarning)})
        for message in row.warnings:
            log(f"  warning: {message}")
        row.state_bytes = optimizer_state_bytes(optimizer)
        rows.append(row)
        log(f"  {label:<20} first step {row.one_time_ms:9.1f} ms, state {row.state_bytes / MB:9.2f} MB")

    for r in range(rounds):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            row.step_ms.append(timed_step(row.optimizer, device))
        log(f"  round {r + 1}/{rounds}: " + " ".join(f"{row.step_ms[-1]:.0f}" for row in rows) + " ms")

    for row in rows:
        row.one_time_ms -= row.median_ms
        row.peak_extra_bytes = peak_extra_bytes(row.optimizer, device)
        row.optimizer = None  # free this model's parameters and state before the next model
    return rows


def _ratio(rows: list[Row], label: str, baseline: str) -> float | None:
    by_label = {row.label: row for row in rows}
    if label not in by_label or baseline not in by_label:
        return None
    return by_label[label].median_ms / by_label[baseline].median_ms


def markdown_table(rows: list[Row]) -> str:
    by_label = {row.label: row for row in rows}
    adam = by_label[BASELINE]
    lines = [
        "| optimizer | step ms (median) | p25–p75 ms | × Adam (foreach) | × Adam (fused) | state MB "
        "| state % of Adam | peak extra MB | one-time ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        to_fused = _ratio(rows, row.label, FUSED_BASELINE)
        low, high = row.quartiles_ms
        lines.append(
            f"| {row.label} | {row.median_ms:.1f} | {low:.0f}–{high:.0f} | {row.median_ms / adam.median_ms:.2f} "
            f"| {'–' if to_fused is None else f'{to_fused:.2f}'} | {row.state_bytes / MB:.2f} "
            f"| {100 * row.state_bytes / adam.state_bytes:.2f} | {row.peak_extra_bytes / MB:.1f} "
            f"| {row.one_time_ms:.0f} |"
        )
    return "\n".join(lines)


def target_lines(rows: list[Row]) -> list[str]:
    by_label = {row.label: row for row in rows}
    lines = []
    for label, baseline, limit in TIME_TARGETS:
        ratio = _ratio(rows, label, baseline)
        if ratio is None:
            lines.append(f"- {label} step time ≤ {limit}× {baseline}: not measured (row absent)")
        else:
            verdict = "met" if ratio <= limit else "MISSED"
            lines.append(f"- {label} step time ≤ {limit}× {baseline}: {ratio:.2f}× ({verdict})")
    for label, baseline, limit in STATE_TARGETS:
        share = by_label[label].state_bytes / by_label[baseline].state_bytes
        verdict = "met" if share <= limit else "MISSED"
        lines.append(f"- {label} state ≤ {100 * limit:g}% of {baseline}: {100 * share:.3f}% ({verdict})")
    return lines


def plot(results: dict[str, list[Row]], path: Path, header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 0.45 * 9 * len(results) + 1.2), squeeze=False)
    for (name, rows), (ax_time, ax_state) in zip(results.items(), axes):
        labels = [row.label for row in rows][::-1]
        ordered = rows[::-1]
        adam = next(row for row in rows if row.label == BASELINE)
        colors = [
            "navy" if row.label.startswith("SM3 fused") else "tab:blue" if row.label.startswith("SM3")
            else "tab:orange" if row.label.startswith("Adam") else "tab:gray"
            for row in ordered
        ]
        ratios = [row.median_ms / adam.median_ms for row in ordered]
        bars = ax_time.barh(labels, ratios, color=colors)
        ax_time.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax_time.bar_label(bars, labels=[f"{r:.2f}×  ({row.median_ms:.0f} ms)" for r, row in zip(ratios, ordered)],
                          padding=3, fontsize=8)
        ax_time.set_xlim(0, max(ratios) * 1.45)
        ax_time.set_xlabel("step time relative to Adam (foreach)  (lower is better)")
        ax_time.set_title(f"{name}: step time (median)")
        state_mb = [max(row.state_bytes / MB, 1e-3) for row in ordered]
        bars = ax_state.barh(labels, state_mb, color=colors)
        ax_state.set_xscale("log")
        ax_state.set_xlim(min(state_mb) / 3, max(state_mb) * 30)
        ax_state.bar_label(bars, labels=[f"{mb:.2f} MB" if mb < 10 else f"{mb:.0f} MB" for mb in state_mb],
                           padding=3, fontsize=8)
        ax_state.set_xlabel("optimizer state, MB (log scale)")
        ax_state.set_title(f"{name}: optimizer state")
        ax_state.tick_params(labelleft=False)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOTES = """\
Notes:
- The machine is shared and noisy: p25–p75 shows the spread of the timed rounds; read the medians
  with it.
- Each optimizer steps its own copy of the parameters; all share one set of random gradients drawn
  once. Round 0 (the first step of each) is a warm-up; the medians are over the timed rounds, which
  step every optimizer once each in a rotated order.
- SM3 (m=…) rows: the chunked in-place default path (`fused=False` where the constructor has
  `fused`); SM3 fused rows: `fused=True`.
- Adagrad, Adafactor and SGD run torch's default kernels (a per-parameter loop on CPU, foreach on CUDA).
- state MB: `optimizer_state_bytes` after the first step (step counters included).
- peak extra MB: the transient memory of one steady-state step beyond params, grads and state.
  {peak_method}
- one-time ms: constructor + first step − median step (one sample, so it carries the machine's noise). For every row this includes the lazy
  allocation of the state; for the SM3 fused rows it is the fused path's one-time compile cost
  ({build}). The kernel is built once per process, so the first fused row to step pays it.
"""

PEAK_METHODS = {
    "cpu": "CPU: measured with `torch.profiler.profile(profile_memory=True)` over one step, as the peak of the\n"
    "  running sum of its allocation/free events (PyTorch's allocator only; a native kernel's private buffers\n"
    "  are not seen).",
    "cuda": "CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes\n"
    "  allocated before the step.",
}


def main(argv: list[str] | None = None) -> dict[str, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "base", "big", "both"], default="base",
                        help="parameter shapes; 'both' = base and big (tiny is for tests)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds after the warm-up step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cold-build", action="store_true",
                        help="build the fused SM3 kernel in a fresh TORCH_EXTENSIONS_DIR, so that its "
                             "one-time cost is a full compile rather than a cache load")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="make glibc's malloc keep freed memory (see keep_freed_memory): "
                             "optimizers that allocate per-step temporaries then reuse them instead of "
                             "page-faulting them in every step")
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    args = parser.parse_args(argv)

    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc (Linux)")
    cold_dir = None
    if args.cold_build:
        cold_dir = tempfile.TemporaryDirectory(prefix="sm3_ext_")
        os.environ["TORCH_EXTENSIONS_DIR"] = cold_dir.name

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    allocator = "glibc malloc keeping freed memory" if args.keep_freed_memory else "default allocator settings"
    header = (f"device: {args.device} — {device_name}; torch {torch.__version__}; threads: {torch.get_num_threads()}; "
              f"{allocator}; sm3 at {sm3_revision()}")
    print(header)
    if not sm3_has_fused():
        print("note: SM3.__init__ has no `fused` argument in this checkout; the SM3 fused rows are omitted")
    build = "cold build in a fresh extension directory" if args.cold_build else "torch's extension cache as found"
    if args.device == "cuda":
        build = "Triton compile"

    names = ["base", "big"] if args.model == "both" else [args.model]
    results, sections = {}, []
    for name in names:
        spec = MODELS[name]
        count = parameter_count(model_shapes(spec))
        embedding = spec.vocab * spec.d_model
        assert isinstance(spec, TransformerSpec)
        title = (f"{spec.name}: d={spec.d_model}, ff={spec.d_ff}, {spec.heads} heads, "
                 f"{spec.encoder_layers}+{spec.decoder_layers} layers, vocab {spec.vocab}; "
                 f"{count:,} parameters ({(count - embedding) / 1e6:.1f}M + {embedding / 1e6:.1f}M shared embedding)")
        print(f"\n{title}; {args.rounds} rounds")
        rows = bench_model(spec, args.rounds, args.device)
        results[spec.name] = rows
        table = markdown_table(rows)
        targets = "\n".join(target_lines(rows))
        print(f"\n### {title}\n\n{table}\n\nTargets:\n{targets}")
        sections.append(f"### {title}\n\n{args.rounds} timed rounds.\n\n{table}\n\nTargets:\n\n{targets}\n")

    notes = NOTES.format(peak_method=PEAK_METHODS[args.device], build=build)
    for message in sorted({m for rows in results.values() for row in rows for m in row.warnings}):
        notes += f"- warning during the first step of {message}\n"
    if not sm3_has_fused():
        notes += "- SM3.__init__ has no `fused` argument in this checkout: the SM3 fused rows are omitted.\n"
    print("\n" + notes)
    if args.out:
        command = "uv run python scripts/bench_optim.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Optimizer step time and memory\n\n`{command.strip()}`\n\n{header}\n\n" + "\n".join(sections)
            + "\n" + notes
        )
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot, header)
        print(f"wrote {args.plot}")
    if cold_dir is not None:
        cold_dir.cleanup()
    return results


if __name__ == "__main__":
    main()
