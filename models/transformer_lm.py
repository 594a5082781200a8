"""A decoder-only Transformer language model built from the translation model's blocks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.transformer import Block, sequence_loss, sinusoidal_positions


class TransformerLM(nn.Module):
    """Causal self-attention blocks over sinusoidal positions; the input embedding is the output projection."""

    def __init__(self, vocab_size: int, d_model: int, d_ff: int, heads: int, layers: int,
                 dropout: float = 0.1, pre_norm: bool = True, max_positions: int = 1024, pad_id: int = 0):
        super().__init__()
        self.d_model, self.pad_id = d_model, pad_id
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.register_buffer("positions", sinusoidal_positions(max_positions, d_model), persistent=False)
        self.blocks = nn.ModuleList(Block(d_model, d_ff, heads, dropout, pre_norm, cross=False) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()  # pre-norm stacks end un-normalised
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, T, vocab); position t sees tokens[:, :t + 1] only."""
        length = tokens.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"sequence of {length} tokens exceeds model.max_positions={self.positions.shape[0]}")
        x = self.drop(self.embedding(tokens) * math.sqrt(self.d_model) + self.positions[:length])
        # No key mask: pad only ever follows real tokens, so causality already keeps it out of their view.
        for block in self.blocks:
            x = block(x, causal=True)
        return self.norm(x) @ self.embedding.weight.T

    def loss(self, input: Tensor, target: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """(summed label-smoothed cross-entropy, summed negative log-likelihood) over non-pad targets."""
        return sequence_loss(self(input), target, self.pad_id, label_smoothing)
