"""A decoder-only Transformer language model built from the translation model's blocks."""

from __future__ import annotations

from torch import Tensor, nn

from models.embedding import TiedEmbedding
from models.transformer import Block, sequence_loss


class TransformerLM(nn.Module):
    """Causal self-attention blocks over sinusoidal positions; the input embedding is the output projection."""

    def __init__(self, vocab_size: int, d_model: int, d_ff: int, heads: int, layers: int,
                 dropout: float = 0.1, pre_norm: bool = True, max_positions: int = 1024, pad_id: int = 0):
        super().__init__()
        self.d_model, self.pad_id = d_model, pad_id
        self.embedding = TiedEmbedding(vocab_size, d_model, pad_id, max_positions, dropout)
        self.blocks = nn.ModuleList(Block(d_model, d_ff, heads, dropout, pre_norm, cross=False) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()  # pre-norm stacks end un-normalised

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, T, vocab); position t sees tokens[:, :t + 1] only."""
        x = self.embedding(tokens)
        # No key mask: pad only ever follows real tokens, so causality already keeps it out of their view.
        for block in self.blocks:
            x = block(x, causal=True)
        return self.embedding.logits(self.norm(x))

    def loss(self, input: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Summed label-smoothed cross-entropy over non-pad targets (``sequence_loss``; label_smoothing 0: the
        negative log-likelihood)."""
        return sequence_loss(self(input), target, self.pad_id, label_smoothing)
