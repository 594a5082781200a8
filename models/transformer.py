"""An encoder-decoder Transformer (Vaswani et al., 2017) for translation, with decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.embedding import TiedEmbedding


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None, causal: bool = False,
                cache: dict | None = None) -> Tensor:
        """``cache``: decoding one position at a time. Self-attention (``memory is x``) appends the new
        position's keys and values to the cached ones; cross-attention projects the memory once."""
        def split(t: Tensor) -> Tensor:  # (B, T, D) -> (B, heads, T, D / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        if cache is None:
            k, v = split(self.k(memory)), split(self.v(memory))
        elif memory is x:
            k, v = split(self.k(x)), split(self.v(x))
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            causal = False  # the one query is the newest position: it sees every cached key
        else:
            if "k" not in cache:
                cache["k"], cache["v"] = split(self.k(memory)), split(self.v(memory))
            k, v = cache["k"], cache["v"]
        y = F.scaled_dot_product_attention(
            split(self.q(x)), k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal)
        return self.out(y.transpose(1, 2).flatten(-2))


class Block(nn.Module):
    """Self-attention, optional cross-attention and a feed-forward layer, each residual."""

    def __init__(self, d_model: int, d_ff: int, heads: int, dropout: float, pre_norm: bool, cross: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(d_model, heads, dropout)
        self.cross_attn = Attention(d_model, heads, dropout) if cross else None
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, fn) -> Tensor:
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x: Tensor, self_mask=None, memory=None, memory_mask=None, causal=False, cache=None) -> Tensor:
        """``cache``: {"self": {}, "cross": {}} of this block, for decoding one position at a time."""
        caches = cache or {}
        x = self._residual(x, self.norms[0], lambda h: self.self_attn(h, h, self_mask, causal, caches.get("self")))
        if self.cross_attn is not None:
            x = self._residual(x, self.norms[1],
                               lambda h: self.cross_attn(h, memory, memory_mask, cache=caches.get("cross")))
        return self._residual(x, self.norms[-1], self.ffn)


class Transformer(nn.Module):
    """Encoder-decoder with one embedding shared by source, target and output projection."""

    def __init__(self, vocab_size: int, d_model: int, d_ff: int, heads: int, encoder_layers: int,
                 decoder_layers: int, dropout: float = 0.1, pre_norm: bool = True,
                 max_positions: int = 1024, pad_id: int = 0):
        super().__init__()
        self.d_model, self.pad_id, self.pre_norm = d_model, pad_id, pre_norm
        self.embedding = TiedEmbedding(vocab_size, d_model, pad_id, max_positions, dropout)
        self.encoder = nn.ModuleList(
            Block(d_model, d_ff, heads, dropout, pre_norm, cross=False) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(
            Block(d_model, d_ff, heads, dropout, pre_norm, cross=True) for _ in range(decoder_layers))
        # Pre-norm stacks end with a LayerNorm; post-norm blocks already end normalised.
        self.encoder_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the encoder output and the key mask (B, 1, 1, S), True where attended."""
        mask = (src != self.pad_id)[:, None, None, :]
        x = self.embedding(src)
        for block in self.encoder:
            x = block(x, self_mask=mask)
        return self.encoder_norm(x), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor, cache: list[dict] | None = None) -> Tensor:
        """Logits (B, T, vocab) for every target position (causal). With ``cache`` (from ``new_cache``),
        ``tgt_in`` is the next position alone and the earlier ones come from the cache, which it extends."""
        start = 0 if cache is None or "k" not in cache[0]["self"] else cache[0]["self"]["k"].shape[2]
        x = self.embedding(tgt_in, start)
        for i, block in enumerate(self.decoder):
            x = block(x, memory=memory, memory_mask=memory_mask, causal=True, cache=None if cache is None else cache[i])
        return self.embedding.logits(self.decoder_norm(x))

    def new_cache(self) -> list[dict]:
        """An empty key/value cache for ``decode``: a (self, cross) pair of dicts per decoder block."""
        return [{"self": {}, "cross": {}} for _ in self.decoder]

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    def loss(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Summed label-smoothed cross-entropy over non-pad targets (``sequence_loss``; label_smoothing 0: the
        negative log-likelihood)."""
        return sequence_loss(self(src, tgt_in), tgt_out, self.pad_id, label_smoothing)

    @torch.no_grad()
    def generate(self, src: Tensor, bos_id: int, eos_id: int, max_len: int, beam_size: int = 1,
                 length_penalty: float = 1.0, use_cache: bool = True) -> list[list[int]]:
        """Greedy (beam_size 1) or beam search; returns token ids without bos/eos. ``use_cache=False`` runs the
        whole prefix through the decoder every step instead (the same tokens, slower: scripts/bench_eval.py)."""
        memory, mask = self.encode(src)
        cache = self.new_cache() if use_cache else None
        if beam_size > 1:
            return self._beam_search(memory, mask, bos_id, eos_id, max_len, beam_size, length_penalty, cache)
        batch = src.shape[0]
        tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(batch, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            next_token = self._next_logits(tokens, memory, mask, cache).argmax(-1)
            next_token = next_token.masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == eos_id
            if done.all():
                break
        return [_strip(row, eos_id, self.pad_id) for row in tokens[:, 1:].tolist()]

    def _next_logits(self, tokens: Tensor, memory: Tensor, mask: Tensor, cache: list[dict] | None) -> Tensor:
        """Logits (B, vocab) of the position after ``tokens``: from the newest token and the cache, or without
        one from the whole prefix."""
        return (self.decode(tokens, memory, mask) if cache is None else
                self.decode(tokens[:, -1:], memory, mask, cache))[:, -1]

    def _beam_search(self, memory, mask, bos_id, eos_id, max_len, beam, alpha, cache=None) -> list[list[int]]:
        """``cache``: empty (``new_cache``), filled from the beams' memory, or None to decode without one."""
        batch, device = memory.shape[0], memory.device
        memory, mask = memory.repeat_interleave(beam, 0), mask.repeat_interleave(beam, 0)
        tokens = torch.full((batch * beam, 1), bos_id, dtype=torch.long, device=device)
        scores = torch.zeros(batch, beam, device=device)
        scores[:, 1:] = -float("inf")  # all beams start identical: keep one alive
        finished = torch.zeros(batch * beam, dtype=torch.bool, device=device)
        for step in range(max_len):
            logp = self._next_logits(tokens, memory, mask, cache).float().log_softmax(-1)
            vocab = logp.shape[-1]
            # A finished hypothesis only extends with pad, at no cost.
            logp[finished] = -float("inf")
            logp[finished, self.pad_id] = 0.0
            candidates = (scores.view(-1, 1) + logp).view(batch, beam * vocab)
            scores, flat = candidates.topk(beam, dim=-1)
            origin = (flat // vocab) + torch.arange(batch, device=device)[:, None] * beam
            next_token = (flat % vocab).view(-1)
            tokens = torch.cat([tokens[origin.view(-1)], next_token[:, None]], dim=1)
            for layer in cache or []:  # each surviving hypothesis keeps the keys and values of its own prefix
                layer["self"]["k"], layer["self"]["v"] = (layer["self"][kv][origin.view(-1)] for kv in "kv")
            finished = finished[origin.view(-1)] | (next_token == eos_id)
            if finished.all():
                break
        lengths = ((tokens[:, 1:] != self.pad_id) & (tokens[:, 1:] != eos_id)).sum(-1).float() + 1
        normalised = scores.view(-1) / (((5 + lengths) / 6) ** alpha)  # GNMT length penalty
        best = normalised.view(batch, beam).argmax(-1) + torch.arange(batch, device=device) * beam
        return [_strip(row, eos_id, self.pad_id) for row in tokens[best, 1:].tolist()]


def sequence_loss(logits: Tensor, target: Tensor, pad_id: int, label_smoothing: float = 0.0) -> Tensor:
    """Summed label-smoothed cross-entropy over non-pad targets: with ``label_smoothing`` 0, the negative
    log-likelihood. One value a call: training wants the first and evaluation the second, and computing both had
    cost every training step a second log-softmax over the vocabulary (~3% of the study's step).

    A function of the logits, so a wrapped model (DistributedDataParallel) can be called for them."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")


def _strip(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    out = []
    for token in ids:
        if token in (eos_id, pad_id):
            break
        out.append(token)
    return out
