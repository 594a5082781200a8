"""Language-modelling data: text -> one SentencePiece token stream per split -> windows.

    from data import LMDataConfig, load_lm_data
    ld = load_lm_data(LMDataConfig(), seed=0)
    for batch in ld.batches("train", epoch=0):
        loss = F.cross_entropy(logits.flatten(0, 1), batch.target.flatten(),
                               ignore_index=ld.tokenizer.pad_id, reduction="sum")

Every document (a line of text) becomes `bos + ids + eos`; a split's documents are
concatenated into one stream, which is cut into windows of `seq_len + 1` tokens that
overlap by one, so each window gives `seq_len` inputs and their next-token targets and
every token after the first is a target exactly once per epoch. The last window is
right-padded with pad_id (pad targets are ignored by the loss). Perplexity is
exp(summed NLL / `token_count(split)`). Streams are cached under
`cache_dir/lm-streams`, keyed by the tokenizer and the text, and memory-mapped.

Corpora (`LMDataConfig.name`):
  * builtin: both sides of the built-in translation generator (`data.synthetic`), each
    pair as an English line followed by its French line; offline and deterministic.
  * wikitext103: `datasets.load_dataset("wikitext", "wikitext-103-raw-v1")`. Empty lines
    are dropped; the " = Heading = " lines are kept, as in the usual WikiText perplexity
    numbers, each paragraph and heading being one document.
  * lm1b: `datasets.load_dataset("lm1b")` (train/test); valid is a fixed sample of
    `num_valid` train sentences, removed from train.
  * local: plain UTF-8 text files, one document per line, read through
    `datasets.load_dataset("text", ...)`; missing valid/test are carved out of train.
"""

from __future__ import annotations

import collections.abc
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .batching import shard
from .builtin import write_builtin_jsonl
from .config import as_config, resolve_path
from .corpus import (SPLITS, DataError, carve, carve_missing_splits, column_as_list, iter_lines,
                     load_hub_dataset, read_jsonl_splits, normalize_text, quiet_datasets)
from .files import write_then_rename
from .tokenizer import Tokenizer, train_or_load_tokenizer
from .translation import BUILTIN_DATA_SEED

logger = logging.getLogger(__name__)

LM_CORPORA = ("builtin", "wikitext103", "lm1b", "local")

# Documents tokenised per SentencePiece call; bounds the Python lists alive at once.
_ENCODE_CHUNK = 65536


@dataclass
class LMDataConfig:
    """Schema of the language-modelling `data` options."""

    name: str = "builtin"  # builtin | wikitext103 | lm1b | local
    # local: plain text files, one document per line; valid/test default to carved slices.
    train_path: Optional[str] = None
    valid_path: Optional[str] = None
    test_path: Optional[str] = None
    # builtin: translation pairs per split (each gives an English and a French line);
    # local: valid/test bound the carved splits; lm1b: num_valid is the carved valid size.
    num_train: int = 20000
    num_valid: int = 500
    num_test: int = 500
    vocab_size: int = 1000
    spm_model_type: str = "unigram"  # unigram | bpe | char | word
    seq_len: int = 128  # tokens per training sequence
    max_tokens: int = 4096  # per batch: max_tokens // seq_len sequences
    cache_dir: str = "~/.cache/sm3-translation"


@dataclass
class LMBatch:
    """input/target: [B, T] ids, target[:, t] == input[:, t + 1] within a window; pad at
    the end of a split's last window. num_tokens: non-pad targets (the loss normaliser)."""

    input: torch.Tensor
    target: torch.Tensor
    num_tokens: int

    def to(self, device, non_blocking: bool = False) -> "LMBatch":
        return LMBatch(self.input.to(device, non_blocking=non_blocking),
                       self.target.to(device, non_blocking=non_blocking), self.num_tokens)


class Windows:
    """The `seq_len + 1`-token windows of a stream, overlapping by one token.

    Full windows are a strided view of the stream (no copy: a memory-mapped stream stays
    shared between processes); only the last, partial window is a padded copy.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, pad_id: int):
        if seq_len < 1:
            raise DataError(f"data.seq_len must be at least 1, got {seq_len}")
        targets = max(len(stream) - 1, 0)
        num_full, remainder = divmod(targets, seq_len)
        if num_full:
            self.full = stream[:num_full * seq_len + 1].unfold(0, seq_len + 1, seq_len)
        else:
            self.full = stream.new_zeros((0, seq_len + 1))
        self.tail = None
        if remainder:
            self.tail = torch.full((seq_len + 1,), pad_id, dtype=stream.dtype)
            self.tail[:remainder + 1] = stream[num_full * seq_len:]

    def __len__(self) -> int:
        return len(self.full) + (self.tail is not None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Windows `ids` as a [len(ids), seq_len + 1] int64 tensor."""
        is_tail = ids >= len(self.full)
        if not bool(is_tail.any()):
            return self.full[ids].long()
        rows = torch.empty((len(ids), self.full.shape[1]), dtype=torch.long)
        rows[~is_tail] = self.full[ids[~is_tail]].long()
        rows[is_tail] = self.tail.long()
        return rows


class LMBatches(collections.abc.Sequence):
    """A rank's batches for one epoch, built on access: a list's interface without holding
    every batch of a billion-token split in memory. Indexing and slicing are cheap, so a
    resumed run can skip the batches it has already seen."""

    def __init__(self, windows: Windows, order: torch.Tensor, groups: list[range],
                 pad_id: int):
        self._windows = windows
        self._order = order  # window ids in epoch order
        self._groups = groups  # per batch, positions in `order`
        self._pad_id = pad_id

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        group = self._groups[index]
        rows = self._windows.rows(self._order[group.start:group.stop])
        target = rows[:, 1:]
        return LMBatch(rows[:, :-1], target, int((target != self._pad_id).sum()))


class LMData:
    """The token stream of every split, plus the tokenizer that made it."""

    def __init__(self, config: LMDataConfig, tokenizer: Tokenizer,
                 streams: dict[str, torch.Tensor], seed: int = 0,
                 num_documents: Optional[dict[str, int]] = None):
        self.config = config
        self.tokenizer = tokenizer
        self.streams = streams  # split -> 1-D int32 tensor of bos ids eos bos ids eos ...
        self.seed = seed
        self.num_documents = num_documents or {}

    def token_count(self, split: str) -> int:
        """Targets in one unsharded pass over `split`: the perplexity denominator. Sharded
        passes drop tail batches, so there sum the batches' `num_tokens` over ranks."""
        return max(len(self._stream(split)) - 1, 0)

    def _stream(self, split: str) -> torch.Tensor:
        if split not in self.streams:
            raise KeyError(f"unknown split {split!r}; expected one of {tuple(self.streams)}")
        return self.streams[split]

    def windows(self, split: str, seq_len: Optional[int] = None) -> Windows:
        seq_len = self.config.seq_len if seq_len is None else seq_len
        return Windows(self._stream(split), seq_len, self.tokenizer.pad_id)

    def batches(self, split: str, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                world_size: int = 1, max_tokens: Optional[int] = None,
                seq_len: Optional[int] = None) -> LMBatches:
        """This rank's batches of `split` for `epoch`, a pure function of the arguments and seed.

        Batches hold max_tokens // seq_len windows, the last one possibly fewer. With
        `shuffle` the window order is a permutation drawn from (seed, epoch, split) by a
        local generator; otherwise windows come in stream order. Ranks take every
        world_size-th batch and the tail is dropped so all ranks get the same count.
        """
        seq_len = self.config.seq_len if seq_len is None else seq_len
        max_tokens = self.config.max_tokens if max_tokens is None else max_tokens
        windows = self.windows(split, seq_len)
        batch_size = max_tokens // seq_len
        if batch_size < 1:
            raise DataError(f"data.max_tokens={max_tokens} is smaller than data.seq_len="
                            f"{seq_len}; a batch must hold at least one sequence")
        count = len(windows)
        if shuffle:
            generator = torch.Generator().manual_seed(_stable_seed(self.seed, epoch, split))
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        groups = [range(start, min(start + batch_size, count))
                  for start in range(0, count, batch_size)]
        return LMBatches(windows, order, shard(groups, rank, world_size), self.tokenizer.pad_id)


def _stable_seed(seed: int, epoch: int, split: str) -> int:
    """A 63-bit seed from (seed, epoch, split), equal in every process (unlike hash())."""
    digest = hashlib.sha256(f"sm3-lm:{seed}:{epoch}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------- corpora


def _texts(dataset, column: str = "text") -> list[str]:
    """Non-empty documents of a `datasets` split, whitespace normalised."""
    return [t for t in (normalize_text(t) for t in column_as_list(dataset, column)) if t]


def _read_builtin(cfg: LMDataConfig, cache_dir: str) -> tuple[dict[str, list[str]], list[str]]:
    paths = write_builtin_jsonl(cache_dir, cfg.num_train, cfg.num_valid, cfg.num_test,
                                BUILTIN_DATA_SEED)
    pairs = read_jsonl_splits(paths)
    docs = {split: [line for pair in zip(*pairs[split]) for line in pair] for split in SPLITS}
    # Tokenizer text in the translation task's order (sources then targets): same hash,
    # so a machine that trained the translation tokenizer reuses its cached model.
    sources, targets = pairs["train"]
    return docs, sources + targets


def _read_wikitext103(cache_dir: str) -> dict[str, list[str]]:
    dataset = load_hub_dataset("wikitext", "wikitext-103-raw-v1", cache_dir, "data=local_lm")
    return {split: _texts(dataset[hf_split])
            for split, hf_split in (("train", "train"), ("valid", "validation"), ("test", "test"))}


def _read_lm1b(num_valid: int, cache_dir: str) -> dict[str, list[str]]:
    dataset = load_hub_dataset("lm1b", None, cache_dir, "data=local_lm")
    train = _texts(dataset["train"])
    if num_valid >= len(train):
        raise DataError(f"data.num_valid={num_valid} leaves no lm1b training sentences "
                        f"(train has {len(train)})")
    kept, carved = carve(len(train), {"valid": num_valid})
    return {"train": [train[i] for i in kept], "valid": [train[i] for i in carved["valid"]],
            "test": _texts(dataset["test"])}


def _read_local(cfg: LMDataConfig, cache_dir: str) -> dict[str, list[str]]:
    import datasets

    paths = {split: resolve_path(getattr(cfg, f"{split}_path")) for split in SPLITS}
    if not paths["train"]:
        raise DataError("data.train_path is required when data.name=local")
    paths = {split: path for split, path in paths.items() if path}
    for split, path in paths.items():
        for _ in iter_lines(path, f"data.{split}_path"):
            pass  # only its checks: datasets reads the text
    with quiet_datasets():
        # utf-8-sig drops a byte-order mark, which normalize_text would keep.
        dataset = datasets.load_dataset("text", data_files=paths, encoding="utf-8-sig",
                                        cache_dir=cache_dir)
    docs = {split: _texts(dataset[split]) for split in paths}
    missing = [split for split in ("valid", "test") if split not in docs]
    if missing:
        train = docs["train"]
        kept, carved = carve_missing_splits(len(train), missing, cfg.num_valid, cfg.num_test,
                                            "lines")
        docs["train"] = [train[i] for i in kept]
        docs.update({split: [train[i] for i in positions] for split, positions in carved.items()})
    return docs


def _read_lm_corpus(cfg: LMDataConfig, cache_dir: str) -> tuple[dict[str, list[str]], list[str]]:
    """{split: documents} and the text to train the tokenizer on."""
    hf_cache = os.path.join(cache_dir, "hf")
    if cfg.name == "builtin":
        return _read_builtin(cfg, cache_dir)
    if cfg.name == "wikitext103":
        docs = _read_wikitext103(hf_cache)
    elif cfg.name == "lm1b":
        docs = _read_lm1b(cfg.num_valid, hf_cache)
    elif cfg.name == "local":
        docs = _read_local(cfg, hf_cache)
    else:
        raise DataError(f"data.name must be one of {LM_CORPORA}, got {cfg.name!r}")
    # train_or_load_tokenizer samples a fixed subset of very large corpora.
    return docs, docs["train"]


# --------------------------------------------------------------------------- streams


def encode_stream(tokenizer: Tokenizer, docs: Sequence[str]) -> tuple[torch.Tensor, int]:
    """`bos ids eos` of every document, concatenated into a 1-D int32 tensor.

    Returns (stream, documents kept); documents with no tokens are skipped.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    parts, kept = [], 0
    for start in range(0, len(docs), _ENCODE_CHUNK):
        flat: list[int] = []
        for ids in tokenizer.encode_batch(list(docs[start:start + _ENCODE_CHUNK])):
            if ids:
                flat.append(bos)
                flat.extend(ids)
                flat.append(eos)
                kept += 1
        parts.append(torch.tensor(flat, dtype=torch.int32))
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    return stream, kept


def cached_stream(tokenizer: Tokenizer, docs: Sequence[str], cache_dir: str
                  ) -> tuple[torch.Tensor, int]:
    """`encode_stream`, cached on disk by a hash of the tokenizer model and the text.

    The cached tensor is memory-mapped, so ranks on one machine share one copy of a
    billion-token stream and later runs skip tokenisation.
    """
    digest = hashlib.sha256()
    with open(tokenizer.model_path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\n")
    directory = os.path.join(cache_dir, "lm-streams")
    path = os.path.join(directory, f"stream-{digest.hexdigest()[:20]}.pt")
    if not os.path.exists(path):
        stream, kept = encode_stream(tokenizer, docs)
        os.makedirs(directory, exist_ok=True)
        write_then_rename(path, lambda f: torch.save({"stream": stream, "documents": kept}, f))
        del stream  # reloaded below as a mapping, like every later run
    saved = torch.load(path, mmap=True, weights_only=True)
    return saved["stream"], saved["documents"]


def load_lm_data(cfg: Any, seed: int = 0) -> LMData:
    """Load (generating/downloading and caching as needed) a corpus, its tokenizer and the
    token stream of every split. `seed` only orders training batches."""
    cfg = as_config(cfg, LMDataConfig)
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len must be at least 1, got {cfg.seq_len}")
    if cfg.max_tokens < cfg.seq_len:
        raise DataError(f"data.max_tokens={cfg.max_tokens} is smaller than data.seq_len="
                        f"{cfg.seq_len}; a batch must hold at least one sequence")
    start = time.perf_counter()
    cache_dir = resolve_path(cfg.cache_dir)
    os.makedirs(cache_dir, exist_ok=True)

    docs, tokenizer_text = _read_lm_corpus(cfg, cache_dir)
    if not docs["train"]:
        raise DataError(f"the train split of data.name={cfg.name} has no non-empty lines")
    tokenizer = train_or_load_tokenizer(tokenizer_text, cache_dir, cfg.vocab_size,
                                        cfg.spm_model_type)
    streams, counts = {}, {}
    for split in SPLITS:
        streams[split], counts[split] = cached_stream(tokenizer, docs[split], cache_dir)
        if counts[split] < len(docs[split]):
            logger.info("%s: dropped %d lines with no tokens after normalisation", split,
                        len(docs[split]) - counts[split])
    data = LMData(cfg, tokenizer, streams, seed, counts)
    logger.info("lm data %s: %s tokens, vocab %d, loaded in %.1fs", cfg.name,
                "/".join(f"{len(streams[s])} {s}" for s in SPLITS), tokenizer.vocab_size,
                time.perf_counter() - start)
    return data
