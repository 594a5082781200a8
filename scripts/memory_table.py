"""The SM3 paper's memory comparison, from real optimizer objects on ``meta`` tensors.

For each model the parameters and gradients are created on the ``meta`` device (shapes and
dtypes, no storage), each optimizer is built on them and its state is created by its own code,
so the state sizes are those the optimizer really allocates, for models of any size, in
milliseconds. From them: the largest batch that fits an accelerator of ``--memory-gib``,
given an *estimated* activation memory per sequence (see ``activation_bytes_per_sequence``).

    uv run python scripts/memory_table.py                  # Transformer-Big and BERT-Large, 16 GiB
    uv run python scripts/memory_table.py --memory-gib 32 --bert-seq-len 512
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from scripts._shapes import MODELS, BertSpec, TransformerSpec, model_shapes, parameter_count

from sm3 import SM3, optimizer_state_bytes

GIB = 2**30
MIB = 2**20
PARAM_BYTES = 4  # parameters, gradients and optimizer state in float32

# The fused and the default SM3 paths keep the same state; fused=False keeps this script (and
# its test, which steps real CPU tensors) from building the native kernel.
_SM3_PATH = {"fused": False} if "fused" in inspect.signature(SM3.__init__).parameters else {}

OPTIMIZERS: dict[str, Callable] = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    "SM3 (m=0)": lambda p: SM3(p, lr=0.1, **_SM3_PATH),
    "SM3 (m=0.9)": lambda p: SM3(p, lr=0.1, momentum=0.9, **_SM3_PATH),
}


def make_parameters(shapes, device: str | torch.device) -> list[torch.nn.Parameter]:
    """Parameters with gradients; on ``meta`` they have shapes but no storage."""
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, device=device))
        p.grad = torch.zeros(shape, device=device)
        params.append(p)
    return params


def init_state(optimizer: torch.optim.Optimizer) -> str:
    """Create the optimizer's state with its own code; returns how.

    ``step()`` on meta tensors works for SM3, Adam and Adagrad. Adafactor's step reads values
    with ``.item()`` (its relative step size uses the parameter's norm), which meta tensors
    cannot give; for such optimizers we call the optimizer's own ``_init_group`` (the
    state-allocation half of ``step()`` in torch.optim) with empty output lists instead.
    """
    try:
        optimizer.step()
        return "step()"
    except (RuntimeError, NotImplementedError):
        init_group = getattr(optimizer, "_init_group", None)
        if init_group is None:
            raise
        optimizer.state.clear()  # drop whatever the failed step may have created
        outputs = [name for name in inspect.signature(init_group).parameters if name != "group"]
        for group in optimizer.param_groups:
            init_group(group, *([] for _ in outputs))
        return "_init_group()"


def state_bytes(name: str, shapes, device: str | torch.device = "meta") -> tuple[int, str]:
    """Bytes of ``OPTIMIZERS[name]``'s state for these shapes, and how the state was made."""
    optimizer = OPTIMIZERS[name](make_parameters(shapes, device))
    how = init_state(optimizer)
    return optimizer_state_bytes(optimizer), how


def _layer_bytes(tokens: int, d: int, heads: int, attention_blocks: int, layer_norms: int) -> int:
    # Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    # 16-bit activations, 1-byte dropout masks, d_ff = 4d, no recomputation: an attention
    # block keeps 11·s·h + 5·a·s² bytes, the MLP 19·s·h, a LayerNorm 2·s·h.
    return attention_blocks * (11 * tokens * d + 5 * heads * tokens**2) + 19 * tokens * d + layer_norms * 2 * tokens * d


def activation_bytes_per_sequence(spec, seq_len: int) -> int:
    """Estimated activation bytes one training sequence keeps for the backward pass.

    Per layer, the formula of Korthikanti et al. (2022) for 16-bit training without
    recomputation: an encoder layer s·h·(34 + 5·a·s/h) bytes; a decoder layer (self- and
    cross-attention) s·h·(47 + 10·a·s/h). Plus the embedding output and its dropout mask
    (3·s·h per stack) and the output softmax: 6·V bytes per predicted position (16-bit logits
    and the float32 probabilities of the loss). Transformer: source and target both
    ``seq_len`` tokens, every target position predicted. BERT: 15% of positions predicted.
    """
    s, d, a = seq_len, spec.d_model, spec.heads
    if isinstance(spec, TransformerSpec):
        layers = spec.encoder_layers * _layer_bytes(s, d, a, 1, 2) + spec.decoder_layers * _layer_bytes(s, d, a, 2, 3)
        return layers + 2 * 3 * s * d + 6 * spec.vocab * s
    predicted = math.ceil(0.15 * s)
    return spec.layers * _layer_bytes(s, d, a, 1, 2) + 3 * s * d + 6 * spec.vocab * predicted


@dataclass
class Line:
    optimizer: str
    state_bytes: int
    how: str
    resident_bytes: int  # params + grads + state
    max_batch: int


def memory_lines(spec, seq_len: int, memory_gib: float) -> tuple[list[Line], int, int]:
    shapes = model_shapes(spec)
    weights = 2 * PARAM_BYTES * parameter_count(shapes)  # parameters and gradients
    per_sequence = activation_bytes_per_sequence(spec, seq_len)
    lines = []
    for name in OPTIMIZERS:
        state, how = state_bytes(name, shapes)
        resident = weights + state
        lines.append(Line(name, state, how, resident, max(0, int(memory_gib * GIB - resident) // per_sequence)))
    return lines, parameter_count(shapes), per_sequence


def markdown(spec, seq_len: int, memory_gib: float) -> str:
    lines, count, per_sequence = memory_lines(spec, seq_len, memory_gib)
    adam = next(line for line in lines if line.optimizer == "Adam")
    kind = "source and target" if isinstance(spec, TransformerSpec) else "sequence"
    out = [
        f"### {spec.name}: {count:,} parameters, {kind} length {seq_len}, {memory_gib:g} GiB",
        "",
        f"Estimated activations: {per_sequence / MIB:.1f} MiB per sequence.",
        "",
        "| optimizer | state MiB | state % of Adam | params + grads + state GiB "
        "| max batch (sequences, estimated) | batch × Adam | state made by |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for line in lines:
        ratio = line.max_batch / adam.max_batch if adam.max_batch else float("nan")
        out.append(
            f"| {line.optimizer} | {line.state_bytes / MIB:,.2f} | {100 * line.state_bytes / adam.state_bytes:.2f} "
            f"| {line.resident_bytes / GIB:.2f} | {line.max_batch} | {ratio:.2f} | `{line.how}` on meta |"
        )
    return "\n".join(out)


NOTES = """\
Notes:
- State bytes are exact: each optimizer's own code allocates its state on `meta` tensors
  (`step()`, or `_init_group()` for Adafactor, whose step calls `.item()`), measured with
  `sm3.optimizer_state_bytes`. Parameters, gradients and state are float32.
- The batch sizes are estimates: memory − (params + grads + state), divided by the activation
  bytes of one sequence from the per-layer formula of Korthikanti et al. (2022) for 16-bit
  activations without recomputation (encoder layer s·h·(34 + 5·a·s/h), decoder layer with
  cross-attention s·h·(47 + 10·a·s/h)), plus embeddings and the output softmax (6 bytes per
  vocabulary entry per predicted position). Workspace, fragmentation and framework overhead
  are ignored, so real batches are somewhat smaller; the ratios between optimizers are the point.
"""


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["big", "bert-large"])
    parser.add_argument("--memory-gib", type=float, default=16.0, help="accelerator memory (default 16, as a TPU core)")
    parser.add_argument("--transformer-seq-len", type=int, default=256, help="source and target tokens")
    parser.add_argument("--bert-seq-len", type=int, default=128, help="BERT pre-training length (phase 1: 128)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)

    sections = []
    for name in args.models:
        spec = MODELS[name]
        seq_len = args.bert_seq_len if isinstance(spec, BertSpec) else args.transformer_seq_len
        sections.append(markdown(spec, seq_len, args.memory_gib))
    text = "\n\n".join(sections) + "\n\n" + NOTES
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Optimizer memory and the largest batch\n\n" + text)
    return text


if __name__ == "__main__":
    main()
