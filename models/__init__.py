"""Models of the training repo, built from the `model` config group."""

from models.transformer import Transformer


def build_model(cfg, vocab_size: int, pad_id: int) -> Transformer:
    """A model from its config (`conf/model/*.yaml`)."""
    if cfg.name not in ("transformer",):
        raise ValueError(f"Unknown model.name={cfg.name!r}; valid: 'transformer'")
    return Transformer(
        vocab_size=vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, heads=cfg.heads,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers, dropout=cfg.dropout,
        pre_norm=cfg.pre_norm, max_positions=cfg.max_positions, pad_id=pad_id,
    )


__all__ = ["Transformer", "build_model"]
