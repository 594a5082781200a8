"""Helpers shared by the data tests (tests/test_data.py, tests/test_data_lm.py)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from data import DataConfig, LMDataConfig


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def local_translation_config(tmp_path: Path, **paths) -> DataConfig:
    """A `data=local` translation config over the files `paths` (train_path=..., ...)."""
    return DataConfig(name="local", vocab_size=80, cache_dir=str(tmp_path / "cache"),
                      **{key: str(path) for key, path in paths.items()})


def local_lm_config(tmp_path: Path, **options) -> LMDataConfig:
    """A `data=local_lm` config, small enough for a few dozen lines, over the files in `options`."""
    return LMDataConfig(name="local", vocab_size=60, num_valid=5, num_test=5, seq_len=16,
                        max_tokens=128, cache_dir=str(tmp_path / "cache"),
                        **{key: str(value) for key, value in options.items()})


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


def fake_hub(monkeypatch, splits: dict[str, dict[str, list]] | None = None,
             error: BaseException | None = None) -> list[tuple]:
    """Replace `datasets.load_dataset` for hub corpora by `splits` ({split: {column: values}}),
    or by raising `error`; the local builders ("json", "text") still run. Returns the list of
    (path, name) the hub was asked for."""
    import datasets

    real = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        if path in ("json", "text"):
            return real(path, name, **kwargs)
        calls.append((path, name))
        if error is not None:
            raise error
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)
                                     for split, columns in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls
