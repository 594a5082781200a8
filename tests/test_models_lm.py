"""The decoder-only language model: shapes, causality, pad handling, and that SM3 trains it."""

import pytest
import torch

from models.embedding import TiedEmbedding
from models.transformer import Transformer
from models.transformer_lm import TransformerLM
from sm3 import SM3

VOCAB, PAD = 40, 0


def _model(**kwargs):
    torch.manual_seed(0)
    return TransformerLM(VOCAB, d_model=32, d_ff=64, heads=4, layers=2, dropout=0.0, pad_id=PAD, **kwargs)


def test_logit_shapes_and_tied_embedding():
    model = _model().eval()
    tokens = torch.randint(1, VOCAB, (3, 9))
    assert model(tokens).shape == (3, 9, VOCAB)
    names = [name for name, _ in model.named_parameters()]
    assert sum("embedding" in name for name in names) == 1  # the output projection is the embedding


def test_both_models_share_one_embedding_and_its_position_limit():
    lm = _model(max_positions=8).eval()
    torch.manual_seed(0)
    translation = Transformer(VOCAB, d_model=32, d_ff=64, heads=4, encoder_layers=1, decoder_layers=1,
                              dropout=0.0, max_positions=8, pad_id=PAD).eval()
    tokens = torch.randint(1, VOCAB, (2, 8))
    for model in (lm, translation):
        assert type(model.embedding) is TiedEmbedding
        assert not model.embedding.weight[PAD].any()  # pad embeds to zero (plus its position)
        assert "embedding.weight" in model.state_dict()  # checkpoint keys unchanged by the shared class
    torch.testing.assert_close(translation.embedding(tokens), lm.embedding(tokens))  # same seed, same draw
    with pytest.raises(ValueError, match="max_positions=8"):
        lm(torch.randint(1, VOCAB, (1, 9)))
    with pytest.raises(ValueError, match="max_positions=8"):
        translation(tokens, torch.randint(1, VOCAB, (2, 9)))


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    for pre_norm in (True, False):
        model = _model(pre_norm=pre_norm).eval()
        tokens = torch.randint(1, VOCAB, (2, 10))
        changed = tokens.clone()
        changed[:, 6] = (changed[:, 6] % (VOCAB - 1)) + 1
        before, after = model(tokens), model(changed)
        torch.testing.assert_close(before[:, :6], after[:, :6])
        assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_loss_ignores_pad_targets():
    model = _model().eval()
    tokens = torch.randint(1, VOCAB, (2, 8))
    target = torch.randint(1, VOCAB, (2, 8))
    padded_target = target.clone()
    padded_target[1, 5:] = PAD  # the padded tail of a split's last window
    smoothed, nll = model.loss(tokens, padded_target, label_smoothing=0.1), model.loss(tokens, padded_target)
    logits = model(tokens)
    keep = padded_target != PAD
    expected = torch.nn.functional.cross_entropy(logits[keep], padded_target[keep], reduction="sum")
    torch.testing.assert_close(nll, expected)
    assert smoothed.item() > nll.item() > 0
    # inputs whose targets are pad do not matter either (causality keeps them from earlier positions)
    tokens2 = tokens.clone()
    tokens2[1, 6:] = PAD
    torch.testing.assert_close(model.loss(tokens2, padded_target), nll)


def test_sm3_steps_reduce_the_loss_on_a_repeated_sequence():
    model = _model()
    stream = torch.arange(1, 9).repeat(5)[None]  # 1..8 over and over
    tokens, target = stream[:, :-1], stream[:, 1:]
    optimizer = SM3(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(tokens, target)
        (loss / target.numel()).backward()
        optimizer.step()
        losses.append(loss.item() / target.numel())
    assert losses[-1] < 0.5 * losses[0], losses
