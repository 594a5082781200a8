"""The embedding both models share: token lookup scaled by sqrt(d_model) plus sinusoidal
positions (Vaswani et al., 2017), whose weight is also the output projection."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_positions(length: int, d_model: int) -> Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class TiedEmbedding(nn.Embedding):
    """`forward` embeds token ids (with positions and dropout); `logits` projects hidden states back
    onto the vocabulary with the same weight. A subclass of nn.Embedding, so the one parameter is
    still `embedding.weight` in the models' state dicts and checkpoints."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, max_positions: int, dropout: float):
        super().__init__(vocab_size, d_model, padding_idx=pad_id)
        # Redrawn after nn.Embedding's own N(0, 1) draw rather than instead of it, so a seed gives the
        # same random stream, hence the same initial model, as before this class existed.
        nn.init.normal_(self.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()
        self.register_buffer("positions", sinusoidal_positions(max_positions, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        """(B, T) ids at positions start .. start + T - 1 -> (B, T, d_model) inputs of the first block."""
        end = start + tokens.shape[1]
        if end > self.positions.shape[0]:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_positions={self.positions.shape[0]}")
        return self.drop(super().forward(tokens) * math.sqrt(self.embedding_dim) + self.positions[start:end])

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., d_model) final hidden states -> (..., vocab) logits."""
        return hidden @ self.weight.T
