"""Incremental decoding: the key/value cache gives the logits and translations of decoding the whole prefix."""

import functools

import pytest
import torch

from models.transformer import Transformer, _strip


@functools.cache
def _model(pre_norm: bool) -> Transformer:
    """A small model trained for a moment to reverse its source: untrained, a tied-embedding model repeats one
    token, and every decoding would agree."""
    torch.manual_seed(0)
    model = Transformer(50, 32, 64, 4, 2, 2, dropout=0.0, pre_norm=pre_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        src = torch.randint(4, 50, (32, 8))
        tgt = torch.cat([torch.full((32, 1), 2), src.flip(1), torch.full((32, 1), 3)], dim=1)
        loss = model.loss(src, tgt[:, :-1], tgt[:, 1:]) / tgt[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _source() -> torch.Tensor:
    src = torch.randint(4, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    src[1, 6:] = 0  # padding: the memory mask must reach the cached cross-attention
    return src


@pytest.mark.parametrize("pre_norm", [True, False])
def test_cached_decode_gives_the_logits_of_the_whole_prefix(pre_norm):
    model, src = _model(pre_norm), _source()
    tgt = torch.randint(4, 50, (4, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        memory, mask = model.encode(src)
        full = model.decode(tgt, memory, mask)
        cache = model.new_cache()
        stepped = torch.cat([model.decode(tgt[:, t:t + 1], memory, mask, cache) for t in range(tgt.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def _greedy_without_cache(model: Transformer, src, bos: int, eos: int, max_len: int) -> list[list[int]]:
    """Greedy decoding as plainly as it can be written: the whole prefix through the decoder each step."""
    memory, mask = model.encode(src)
    tokens = torch.full((src.shape[0], 1), bos)
    for _ in range(max_len):
        tokens = torch.cat([tokens, model.decode(tokens, memory, mask)[:, -1:].argmax(-1)], dim=1)
    return [_strip(row, eos, model.pad_id) for row in tokens[:, 1:].tolist()]


@pytest.mark.parametrize("pre_norm", [True, False])
def test_generate_matches_decoding_without_a_cache(pre_norm):
    model, src = _model(pre_norm), _source()
    expected = _greedy_without_cache(model, src, bos=2, eos=3, max_len=12)
    assert model.generate(src, bos_id=2, eos_id=3, max_len=12) == expected
    assert model.generate(src, bos_id=2, eos_id=3, max_len=12, beam_size=1) == expected
    assert model.generate(src, bos_id=2, eos_id=3, max_len=12, use_cache=False) == expected
    assert len({tuple(h) for h in expected}) == len(expected) and max(map(len, expected)) >= 6  # varied, long


def _beam_without_cache(model: Transformer, src, bos: int, eos: int, max_len: int, beam: int, alpha: float):
    """The same beam search, with the whole prefix through the decoder each step (no cache to reorder)."""
    memory, mask = model.encode(src)
    batch, pad = src.shape[0], model.pad_id
    memory, mask = memory.repeat_interleave(beam, 0), mask.repeat_interleave(beam, 0)
    tokens = torch.full((batch * beam, 1), bos)
    scores = torch.full((batch, beam), -float("inf"))
    scores[:, 0] = 0.0
    finished = torch.zeros(batch * beam, dtype=torch.bool)
    for _ in range(max_len):
        logp = model.decode(tokens, memory, mask)[:, -1].log_softmax(-1)
        logp[finished] = -float("inf")
        logp[finished, pad] = 0.0
        vocab = logp.shape[-1]
        scores, flat = (scores.view(-1, 1) + logp).view(batch, beam * vocab).topk(beam, dim=-1)
        origin = (flat // vocab + torch.arange(batch)[:, None] * beam).view(-1)
        tokens = torch.cat([tokens[origin], (flat % vocab).view(-1, 1)], dim=1)
        finished = finished[origin] | (tokens[:, -1] == eos)
        if finished.all():
            break
    lengths = ((tokens[:, 1:] != pad) & (tokens[:, 1:] != eos)).sum(-1).float() + 1
    best = (scores.view(-1) / ((5 + lengths) / 6) ** alpha).view(batch, beam).argmax(-1) + torch.arange(batch) * beam
    return [_strip(row, eos, pad) for row in tokens[best, 1:].tolist()]


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_search_reorders_the_cache_with_its_hypotheses(beam):
    """Beam search re-ranks hypotheses each step: a cache left in the old order would extend other prefixes."""
    model, src = _model(True), _source()
    with torch.no_grad():
        expected = _beam_without_cache(model, src, 2, 3, 12, beam, 1.0)
        got = model.generate(src, bos_id=2, eos_id=3, max_len=12, beam_size=beam)
    assert got == expected == model.generate(src, bos_id=2, eos_id=3, max_len=12, beam_size=beam, use_cache=False)
    assert got != model.generate(src, bos_id=2, eos_id=3, max_len=12)  # beams changed something here
