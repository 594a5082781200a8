"""Models of the training repo, built from the `model` config group."""

from torch import nn

from models.transformer import Transformer
from models.transformer_lm import TransformerLM

MODELS = ("transformer", "transformer_lm")


def build_model(cfg, vocab_size: int, pad_id: int) -> nn.Module:
    """A model from its config (`conf/model/*.yaml`): `transformer` is the encoder-decoder,
    `transformer_lm` the decoder-only language model (its `decoder_layers` blocks; `encoder_layers` unused)."""
    common = dict(vocab_size=vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, heads=cfg.heads, dropout=cfg.dropout,
                  pre_norm=cfg.pre_norm, max_positions=cfg.max_positions, pad_id=pad_id)
    if cfg.name == "transformer":
        return Transformer(encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers, **common)
    if cfg.name == "transformer_lm":
        return TransformerLM(layers=cfg.decoder_layers, **common)
    raise ValueError(f"Unknown model.name={cfg.name!r}; valid: {', '.join(MODELS)}")


__all__ = ["MODELS", "Transformer", "TransformerLM", "build_model"]
