"""Helpers shared by the data tests (tests/test_data.py, tests/test_data_lm.py)."""

from __future__ import annotations

import sentencepiece as spm


def count_tokenizer_trainings(monkeypatch) -> list[dict]:
    """Spy on SentencePiece training: the returned list gets the options of every model trained."""
    trainings = []
    train = spm.SentencePieceTrainer.train

    def spy(**options):
        trainings.append({k: v for k, v in options.items()
                          if k not in ("sentence_iterator", "model_writer")})
        return train(**options)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", spy)
    return trainings
