"""A joint source+target SentencePiece model, trained once and cached by content hash."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from .corpus import DataError
from .files import write_then_rename

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe", "char", "word")
MAX_TRAINING_SENTENCES = 2_000_000


class Tokenizer:
    """Thin wrapper over a SentencePiece model with fixed special ids."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()
        self._special = {PAD_ID, BOS_ID, EOS_ID}

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without bos/eos."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping pad/bos/eos (accepts a list or a 1-D tensor)."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


def _options_for(vocab_size: int, model_type: str) -> dict:
    return {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": 1.0,
        "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
        # Small corpora may not support the requested size: treat it as an upper bound.
        "hard_vocab_limit": False,
        # Determinism: one thread, every sentence (no sampling), no shuffling.
        "num_threads": 1,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "minloglevel": 2,
    }


def train_or_load_tokenizer(texts: Sequence[str], cache_dir: str, vocab_size: int,
                            model_type: str = "unigram") -> Tokenizer:
    """Train SentencePiece on `texts` (one sentence each) unless a cached model matches.

    The cache key hashes the training text and every trainer option, so changing either
    trains a new model and an unchanged setup never retrains.
    """
    if model_type not in MODEL_TYPES:
        raise DataError(f"data.spm_model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 5:
        raise DataError(f"data.vocab_size must be at least 5 (4 special ids), got {vocab_size}")
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no training text for the tokenizer (the train split is empty)")
    if len(texts) > MAX_TRAINING_SENTENCES:
        # Big corpora (WMT): a fixed random sample, chosen by us so training stays deterministic.
        texts = random.Random(0).sample(texts, MAX_TRAINING_SENTENCES)
    options = _options_for(vocab_size, model_type)
    digest = hashlib.sha256()
    digest.update(json.dumps({"sentencepiece": spm.__version__, **options},
                             sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\n")
    directory = Path(cache_dir) / "tokenizers"
    model_path = directory / f"spm-{model_type}-{vocab_size}-{digest.hexdigest()[:16]}.model"
    if not model_path.exists():
        _train(texts, options, model_path)
    tokenizer = Tokenizer(str(model_path))
    if tokenizer.vocab_size < vocab_size:
        # hard_vocab_limit=False lets SentencePiece stop short; say so on every load, or
        # the configured size would pass for the model's.
        logger.warning("data.vocab_size=%d is more than this corpus supports; SentencePiece "
                       "used %d pieces", vocab_size, tokenizer.vocab_size)
    return tokenizer


def _train(texts: list[str], options: dict, model_path: Path) -> None:
    """Train SentencePiece on `texts` with `options`; write the model to `model_path`."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Training from an iterator into memory keeps file paths out of the model proto,
    # so the same text and options give byte-identical model files anywhere.
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                       **options)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}") from None
    write_then_rename(model_path, lambda f: f.write(model.getvalue()))
    logger.info("trained %s SentencePiece model on %d sentences -> %s", options["model_type"],
                len(texts), model_path)
