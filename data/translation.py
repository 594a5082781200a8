"""`load_translation_data`: corpus -> filtered text -> SentencePiece ids -> batches."""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

from .batching import Batch, bucket_indices, collate, example_cost, shard
from .config import as_config, resolve_path
from .corpus import (SPLITS, DataError, drop_empty_pairs, read_jsonl_splits, load_wmt14,
                     read_local_corpus)
from .builtin import GENERATORS, write_builtin_jsonl
from .tokenizer import Tokenizer, train_or_load_tokenizer

logger = logging.getLogger(__name__)

CORPORA = ("builtin", "builtin_sentences", "wmt14_en_fr", "wmt14_en_de", "local")

# The built-in task does not depend on the training seed, so runs with different
# seeds train and evaluate on the same sentences; the seed only orders batches.
BUILTIN_DATA_SEED = 0


@dataclass
class DataConfig:
    """Schema of the `data` config group."""

    name: str = "builtin"  # builtin | builtin_sentences | wmt14_en_fr | wmt14_en_de | local
    source_lang: str = "en"
    target_lang: str = "fr"
    # local: each split is a .tsv / .jsonl file, or a source text file plus its
    # line-aligned target text file. valid/test default to slices carved from train.
    train_path: Optional[str] = None
    train_target_path: Optional[str] = None
    valid_path: Optional[str] = None
    valid_target_path: Optional[str] = None
    test_path: Optional[str] = None
    test_target_path: Optional[str] = None
    num_train: int = 20000  # builtin split sizes (valid/test also bound carved local splits)
    num_valid: int = 500
    num_test: int = 500
    max_valid: Optional[int] = None  # evaluate at most this many valid/test sentences
    vocab_size: int = 1000
    spm_model_type: str = "unigram"  # unigram | bpe | char | word
    max_len: int = 128  # tokens incl. eos/bos; longer pairs are dropped
    max_tokens: int = 4096  # per batch, counting padding
    cache_dir: str = "~/.cache/sm3-translation"


class TranslationData:
    """Raw text and token ids of every split, plus the shared tokenizer."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer, sources: dict[str, list[str]],
                 targets: dict[str, list[str]], seed: int = 0,
                 source_ids: Optional[dict[str, list[list[int]]]] = None,
                 target_ids: Optional[dict[str, list[list[int]]]] = None):
        self.config = config
        self.tokenizer = tokenizer
        self.sources = sources
        self.targets = targets
        self.seed = seed
        # Tokenised once here, so batches() only sorts and pads.
        self.source_ids = source_ids or {s: tokenizer.encode_batch(sources[s]) for s in sources}
        self.target_ids = target_ids or {s: tokenizer.encode_batch(targets[s]) for s in targets}

    def __len__(self) -> int:
        return len(self.sources["train"])

    def batches(self, split: str, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                world_size: int = 1, max_tokens: Optional[int] = None) -> list[Batch]:
        """This rank's batches of `split` for `epoch`, a pure function of the arguments and seed."""
        if split not in self.sources:
            raise KeyError(f"unknown split {split!r}; expected one of {tuple(self.sources)}")
        max_tokens = self.config.max_tokens if max_tokens is None else max_tokens
        source_ids, target_ids = self.source_ids[split], self.target_ids[split]
        costs = [example_cost(s, t) for s, t in zip(source_ids, target_ids)]
        if costs and max(costs) > max_tokens:
            raise DataError(f"max_tokens={max_tokens} is smaller than the longest {split} "
                            f"example ({max(costs)} tokens); raise data.max_tokens or lower "
                            "data.max_len")
        # A string seed is hashed with SHA-512 by random.Random: stable across processes.
        rng = random.Random(f"{self.seed}:{epoch}:{split}") if shuffle else None
        groups = shard(bucket_indices(costs, max_tokens, rng), rank, world_size)
        tok = self.tokenizer
        return [collate(g, source_ids, target_ids, tok.pad_id, tok.bos_id, tok.eos_id)
                for g in groups]


def _read_corpus(cfg: DataConfig, cache_dir: str) -> dict[str, tuple[list[str], list[str]]]:
    hf_cache = os.path.join(cache_dir, "hf")
    if cfg.name in GENERATORS:
        if (cfg.source_lang, cfg.target_lang) != ("en", "fr"):
            raise DataError(f"the {cfg.name} corpus is en->fr; got data.source_lang="
                            f"{cfg.source_lang!r}, data.target_lang={cfg.target_lang!r}")
        paths = write_builtin_jsonl(cache_dir, cfg.num_train, cfg.num_valid, cfg.num_test,
                                    BUILTIN_DATA_SEED, cfg.name)
        return read_jsonl_splits(paths)
    if cfg.name in ("wmt14_en_fr", "wmt14_en_de"):
        pair = "fr-en" if cfg.name == "wmt14_en_fr" else "de-en"
        return load_wmt14(pair, cfg.source_lang, cfg.target_lang, hf_cache)
    if cfg.name == "local":
        paths = {split: (resolve_path(getattr(cfg, f"{split}_path")),
                         resolve_path(getattr(cfg, f"{split}_target_path")))
                 for split in SPLITS}
        return read_local_corpus(paths, cfg.num_valid, cfg.num_test,
                                 cfg.source_lang, cfg.target_lang)
    raise DataError(f"data.name must be one of {CORPORA}, got {cfg.name!r}")


def load_translation_data(cfg: Any, seed: int = 0) -> TranslationData:
    """Load (generating/downloading and caching as needed) a corpus and its tokenizer.

    Empty pairs and pairs longer than `max_len` tokens are dropped (counts are logged);
    valid/test are then capped at `max_valid` sentences.
    """
    cfg = as_config(cfg, DataConfig)
    if cfg.max_len < 2:
        raise DataError(f"data.max_len must be at least 2, got {cfg.max_len}")
    start = time.perf_counter()
    cache_dir = resolve_path(cfg.cache_dir)
    os.makedirs(cache_dir, exist_ok=True)

    corpus = _read_corpus(cfg, cache_dir)
    corpus = {split: drop_empty_pairs(*corpus[split], split) for split in SPLITS}
    if not corpus["train"][0]:
        raise DataError(f"the train split of data.name={cfg.name} has no non-empty pairs")

    train_sources, train_targets = corpus["train"]
    tokenizer = train_or_load_tokenizer(train_sources + train_targets, cache_dir,
                                        cfg.vocab_size, cfg.spm_model_type)

    sources, targets, all_source_ids, all_target_ids = {}, {}, {}, {}
    for split in SPLITS:
        split_sources, split_targets = corpus[split]
        source_ids = tokenizer.encode_batch(split_sources)
        target_ids = tokenizer.encode_batch(split_targets)
        # Text such as a lone zero-width space normalises to no tokens at all.
        nonempty = [i for i in range(len(split_sources)) if source_ids[i] and target_ids[i]]
        if len(nonempty) < len(split_sources):
            logger.info("%s: dropped %d pairs with no tokens after normalisation", split,
                        len(split_sources) - len(nonempty))
        keep = [i for i in nonempty
                if len(source_ids[i]) + 1 <= cfg.max_len and len(target_ids[i]) + 1 <= cfg.max_len]
        if len(keep) < len(nonempty):
            logger.info("%s: dropped %d of %d pairs longer than max_len=%d tokens", split,
                        len(nonempty) - len(keep), len(nonempty), cfg.max_len)
        if split != "train" and cfg.max_valid is not None:
            keep = keep[:cfg.max_valid]
        sources[split] = [split_sources[i] for i in keep]
        targets[split] = [split_targets[i] for i in keep]
        all_source_ids[split] = [source_ids[i] for i in keep]
        all_target_ids[split] = [target_ids[i] for i in keep]
    if not sources["train"]:
        raise DataError(f"every train pair is longer than data.max_len={cfg.max_len} tokens")

    data = TranslationData(cfg, tokenizer, sources, targets, seed, all_source_ids, all_target_ids)
    logger.info("data %s: %s pairs, vocab %d, loaded in %.1fs", cfg.name,
                "/".join(f"{len(sources[s])} {s}" for s in SPLITS), tokenizer.vocab_size,
                time.perf_counter() - start)
    return data
