"""Parameter shapes of the models the benchmarks and the memory table use.

Only shapes: no modules are built, so the scripts can allocate exactly what they need (real
tensors for timing, ``meta`` tensors for the memory table). The layouts follow the usual
PyTorch conventions (``nn.Linear`` weight is ``(out, in)``, biases and LayerNorm are 1-D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TransformerSpec:
    """An encoder-decoder Transformer (Vaswani et al., 2017) with one shared embedding.

    The ``vocab x d_model`` embedding is shared by the encoder input, the decoder input and
    the output projection (three-way tying, as in tensor2tensor), positional encodings are
    sinusoidal (no parameters), and each stack ends with a LayerNorm (pre-norm layout).
    """

    name: str
    d_model: int
    d_ff: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    vocab: int


@dataclass(frozen=True)
class BertSpec:
    """A BERT encoder (Devlin et al., 2019) with its pre-training heads (MLM tied to the embedding, NSP)."""

    name: str
    d_model: int
    d_ff: int
    heads: int
    layers: int
    vocab: int
    max_positions: int = 512
    token_types: int = 2


TRANSFORMER_TINY = TransformerSpec("Transformer-tiny", d_model=32, d_ff=64, heads=2, encoder_layers=1, decoder_layers=1, vocab=96)
TRANSFORMER_BASE = TransformerSpec("Transformer-base", d_model=512, d_ff=2048, heads=8, encoder_layers=6, decoder_layers=6, vocab=32000)
TRANSFORMER_BIG = TransformerSpec("Transformer-Big", d_model=1024, d_ff=4096, heads=16, encoder_layers=6, decoder_layers=6, vocab=32000)
BERT_LARGE = BertSpec("BERT-Large", d_model=1024, d_ff=4096, heads=16, layers=24, vocab=30522)

MODELS = {"tiny": TRANSFORMER_TINY, "base": TRANSFORMER_BASE, "big": TRANSFORMER_BIG, "bert-large": BERT_LARGE}


def _linear(prefix: str, d_in: int, d_out: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (d_out, d_in)), (f"{prefix}.bias", (d_out,))]


def _layer_norm(prefix: str, d: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (d,)), (f"{prefix}.bias", (d,))]


def _attention(prefix: str, d: int) -> list[tuple[str, Shape]]:
    return [s for proj in ("q", "k", "v", "out") for s in _linear(f"{prefix}.{proj}", d, d)]


def _ffn(prefix: str, d: int, d_ff: int) -> list[tuple[str, Shape]]:
    return _linear(f"{prefix}.fc1", d, d_ff) + _linear(f"{prefix}.fc2", d_ff, d)


def transformer_shapes(spec: TransformerSpec) -> list[tuple[str, Shape]]:
    d, ff = spec.d_model, spec.d_ff
    shapes = [("embedding.weight", (spec.vocab, d))]
    for i in range(spec.encoder_layers):
        p = f"encoder.{i}"
        shapes += _attention(f"{p}.self_attn", d) + _layer_norm(f"{p}.norm1", d)
        shapes += _ffn(f"{p}.ffn", d, ff) + _layer_norm(f"{p}.norm2", d)
    shapes += _layer_norm("encoder.norm", d)
    for i in range(spec.decoder_layers):
        p = f"decoder.{i}"
        shapes += _attention(f"{p}.self_attn", d) + _layer_norm(f"{p}.norm1", d)
        shapes += _attention(f"{p}.cross_attn", d) + _layer_norm(f"{p}.norm2", d)
        shapes += _ffn(f"{p}.ffn", d, ff) + _layer_norm(f"{p}.norm3", d)
    shapes += _layer_norm("decoder.norm", d)
    return shapes


def bert_shapes(spec: BertSpec) -> list[tuple[str, Shape]]:
    d, ff = spec.d_model, spec.d_ff
    shapes = [
        ("embeddings.word.weight", (spec.vocab, d)),
        ("embeddings.position.weight", (spec.max_positions, d)),
        ("embeddings.token_type.weight", (spec.token_types, d)),
    ] + _layer_norm("embeddings.norm", d)
    for i in range(spec.layers):
        p = f"encoder.{i}"
        shapes += _attention(f"{p}.attn", d) + _layer_norm(f"{p}.norm1", d)
        shapes += _ffn(f"{p}.ffn", d, ff) + _layer_norm(f"{p}.norm2", d)
    shapes += _linear("pooler", d, d)
    # MLM head: a transform, then the decoder tied to the word embedding plus its own bias.
    shapes += _linear("mlm.transform", d, d) + _layer_norm("mlm.norm", d) + [("mlm.bias", (spec.vocab,))]
    shapes += _linear("nsp", d, 2)
    return shapes


def model_shapes(spec: TransformerSpec | BertSpec) -> list[tuple[str, Shape]]:
    return transformer_shapes(spec) if isinstance(spec, TransformerSpec) else bert_shapes(spec)


def parameter_count(shapes: list[tuple[str, Shape]]) -> int:
    return sum(math.prod(shape) for _, shape in shapes)
