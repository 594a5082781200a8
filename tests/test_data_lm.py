"""Tests for data/lm.py: corpora, token streams, next-token windows, batches, errors."""

import random

import pytest
import torch
from omegaconf import OmegaConf

import data.lm
from data import DataError, LMBatch, LMDataConfig, load_lm_data
from data.lm import LMData, encode_stream
from data.synthetic import generate_splits
from tests.helpers_data import count_tokenizer_trainings, fake_hub, local_lm_config, write_text

SEQ_LEN, MAX_TOKENS = 16, 128  # 8 sequences per batch


def _config(cache_dir, **overrides) -> LMDataConfig:
    options = dict(num_train=400, num_valid=30, num_test=30, vocab_size=120, seq_len=SEQ_LEN,
                   max_tokens=MAX_TOKENS, cache_dir=str(cache_dir))
    options.update(overrides)
    return LMDataConfig(**options)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return load_lm_data(_config(tmp_path_factory.mktemp("cache")), seed=0)


def _all_windows(data, split) -> torch.Tensor:
    windows = data.windows(split)
    return windows.rows(torch.arange(len(windows)))


def _targets(batches) -> torch.Tensor:
    """Every non-pad target of `batches`, in batch order."""
    return torch.cat([b.target[b.target != 0] for b in batches])


# --------------------------------------------------------------------------- builtin


def test_builtin_documents_are_both_sides_of_the_generator(builtin):
    tok = builtin.tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert builtin.num_documents == {"train": 800, "valid": 60, "test": 60}
    pairs = generate_splits(400, 30, 30, seed=0)["valid"]
    stream = builtin.streams["valid"].tolist()
    # bos English eos bos French eos, pair after pair.
    expected = []
    for english, french in pairs[:3]:
        expected += [2, *tok.encode(english), 3, 2, *tok.encode(french), 3]
    assert stream[:len(expected)] == expected
    assert stream.count(2) == stream.count(3) == 60 and 0 not in stream


def test_builtin_is_deterministic_and_cached(tmp_path, builtin, monkeypatch):
    trainings = count_tokenizer_trainings(monkeypatch)
    again = load_lm_data(_config(tmp_path), seed=0)
    assert len(trainings) == 1
    for split in ("train", "valid", "test"):
        assert torch.equal(again.streams[split], builtin.streams[split])
    with open(again.tokenizer.model_path, "rb") as f, open(builtin.tokenizer.model_path, "rb") as g:
        assert f.read() == g.read()
    def no_encoding(*args):
        raise AssertionError("streams should come from the cache")

    monkeypatch.setattr(data.lm, "encode_stream", no_encoding)
    cached = load_lm_data(_config(tmp_path), seed=0)
    assert len(trainings) == 1  # cached model, not retrained
    assert torch.equal(cached.streams["train"], builtin.streams["train"])
    assert cached.num_documents == builtin.num_documents


def test_accepts_dictconfig(tmp_path):
    cfg = OmegaConf.create({"num_train": 50, "num_valid": 5, "num_test": 5, "vocab_size": 60,
                            "cache_dir": str(tmp_path), "seq_len": 8, "max_tokens": 64})
    ld = load_lm_data(cfg)
    assert ld.config.seq_len == 8 and ld.token_count("train") == len(ld.streams["train"]) - 1


# --------------------------------------------------------------------------- windows


def test_window_shapes_and_shift(builtin):
    batches = builtin.batches("train", epoch=0)
    assert len(batches) > 3
    for b in batches[:-1]:
        assert isinstance(b, LMBatch)
        assert b.input.shape == b.target.shape == (MAX_TOKENS // SEQ_LEN, SEQ_LEN)
        assert b.input.dtype == b.target.dtype == torch.long
    assert 1 <= len(batches[-1].input) <= MAX_TOKENS // SEQ_LEN
    windows = _all_windows(builtin, "train")
    assert torch.equal(windows[1:, 0], windows[:-1, -1])  # consecutive windows overlap by one
    for b in batches:
        # Inside a window the target is the input moved left by one.
        assert torch.equal(b.target[:, :-1], b.input[:, 1:])
        assert b.num_tokens == int((b.target != 0).sum())


@pytest.mark.parametrize("split, shuffle", [("train", True), ("valid", False), ("test", False)])
def test_every_token_is_a_target_once(builtin, split, shuffle):
    stream = builtin.streams[split].long()
    batches = builtin.batches(split, epoch=3, shuffle=shuffle)
    assert sum(b.num_tokens for b in batches) == builtin.token_count(split) == len(stream) - 1
    if shuffle:  # as a multiset: every window once, in some order
        windows = sorted(tuple(row.tolist()) for b in batches for row in b.target)
        expected = sorted(tuple(row[1:].tolist()) for row in _all_windows(builtin, split))
        assert windows == expected
    else:  # in stream order
        assert torch.equal(_targets(batches), stream[1:])
        assert torch.equal(batches[0].input[0], stream[:SEQ_LEN])


def test_last_window_padded(tmp_path):
    lm = LMData(_config(tmp_path, seq_len=4, max_tokens=8), _FakeTokenizer(),
                {"train": torch.arange(4, 14, dtype=torch.int32)})
    windows = _all_windows(lm, "train")  # 10 tokens -> 9 targets -> 3 windows of 4
    assert windows.tolist() == [[4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 0, 0, 0]]
    last = lm.batches("train", shuffle=False)[-1]
    assert last.input.tolist() == [[12, 13, 0, 0]] and last.target.tolist() == [[13, 0, 0, 0]]
    assert last.num_tokens == 1 and lm.token_count("train") == 9
    exact = LMData(lm.config, _FakeTokenizer(), {"train": torch.arange(4, 13, dtype=torch.int32)})
    assert _all_windows(exact, "train").tolist()[-1] == [8, 9, 10, 11, 12]  # no pad: fits
    assert exact.windows("train").tail is None
    short = LMData(lm.config, _FakeTokenizer(),
                   {"train": torch.tensor([2, 7, 3], dtype=torch.int32)})
    assert _all_windows(short, "train").tolist() == [[2, 7, 3, 0, 0]]
    for length in (0, 1):
        empty = LMData(lm.config, _FakeTokenizer(),
                       {"train": torch.full((length,), 2, dtype=torch.int32)})
        assert len(empty.batches("train")) == 0 and empty.token_count("train") == 0


class _FakeTokenizer:
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def encode_batch(self, texts):
        return [[10 + len(word) for word in text.split()] for text in texts]


def test_encode_stream_skips_empty_documents():
    stream, kept = encode_stream(_FakeTokenizer(), ["ab c", "", "xyz"])
    assert stream.tolist() == [2, 12, 11, 3, 2, 13, 3] and kept == 2
    assert stream.dtype == torch.int32


# --------------------------------------------------------------------------- batch order


def test_epochs_differ_and_are_reproducible(builtin):
    def inputs(epoch, seed=0):
        lm = builtin if seed == 0 else LMData(builtin.config, builtin.tokenizer,
                                              builtin.streams, seed=seed)
        return torch.cat([b.input for b in lm.batches("train", epoch=epoch)])

    assert torch.equal(inputs(0), inputs(0))
    assert not torch.equal(inputs(0), inputs(1))
    assert not torch.equal(inputs(0, seed=1), inputs(0))
    state, torch_state = random.getstate(), torch.get_rng_state()
    inputs(5)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)


def test_eval_batches_in_order_and_shuffle_off(builtin):
    a = builtin.batches("valid", epoch=0, shuffle=False)
    b = builtin.batches("valid", epoch=7, shuffle=False)
    assert all(torch.equal(x.input, y.input) for x, y in zip(a, b))
    assert torch.equal(builtin.batches("train", shuffle=False)[0].input[0],
                       builtin.streams["train"][:SEQ_LEN].long())


def test_rank_sharding(builtin):
    world_size = 3
    whole = builtin.batches("train", epoch=2)
    shards = [builtin.batches("train", epoch=2, rank=r, world_size=world_size)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert sum(len(s) for s in shards) == len(whole) - len(whole) % world_size
    for rank, batches in enumerate(shards):
        for i, b in enumerate(batches):
            assert torch.equal(b.input, whole[rank + i * world_size].input)
    rows = [tuple(row.tolist()) for s in shards for b in s for row in b.target]
    assert len(rows) == len(set(rows))  # disjoint: no window on two ranks
    with pytest.raises(ValueError, match="rank"):
        builtin.batches("train", rank=3, world_size=3)


def test_batch_overrides_and_slicing(builtin):
    batches = builtin.batches("valid", shuffle=False, seq_len=8, max_tokens=64)
    assert batches[0].input.shape == (8, 8)
    assert [b.num_tokens for b in batches[1:3]] == [batches[1].num_tokens, batches[2].num_tokens]
    assert len(batches[1:]) == len(batches) - 1
    moved = batches[0].to("cpu")
    assert torch.equal(moved.target, batches[0].target)
    assert moved.num_tokens == batches[0].num_tokens
    with pytest.raises(KeyError, match="unknown split"):
        builtin.batches("dev")


def test_bad_options(tmp_path):
    with pytest.raises(DataError, match="data.name"):
        load_lm_data(_config(tmp_path, name="ptb"))
    with pytest.raises(DataError, match="max_tokens"):
        load_lm_data(_config(tmp_path, seq_len=64, max_tokens=32))
    with pytest.raises(DataError, match="seq_len"):
        load_lm_data(_config(tmp_path, seq_len=0))


# --------------------------------------------------------------------------- local files


def test_local_files_with_carved_splits(tmp_path):
    lines = [f"line number {i} says hello" for i in range(100)]
    train = write_text(tmp_path / "train.txt", "\ufeff" + "\n".join(lines[:50]) + "\n\n  \n"
                   + "\n".join(lines[50:]) + "\n")
    ld = load_lm_data(local_lm_config(tmp_path, train_path=train))
    assert ld.num_documents == {"train": 90, "valid": 5, "test": 5}
    decoded = {s: [ld.tokenizer.decode(d) for d in _documents(ld.streams[s])] for s in ld.streams}
    assert sorted(decoded["train"] + decoded["valid"] + decoded["test"]) == sorted(lines)
    docs = data.lm._read_local(local_lm_config(tmp_path, train_path=train), str(tmp_path / "hf"))
    assert not any("\ufeff" in d for split in docs.values() for d in split)  # BOM dropped
    again = load_lm_data(local_lm_config(tmp_path, train_path=train))
    assert all(torch.equal(again.streams[s], ld.streams[s]) for s in ld.streams)


def _documents(stream: torch.Tensor) -> list[list[int]]:
    docs, current = [], []
    for token in stream.tolist():
        if token == 2:
            current = []
        elif token == 3:
            docs.append(current)
        else:
            current.append(token)
    return docs


def test_local_files_with_all_splits(tmp_path):
    train = write_text(tmp_path / "train.txt", "".join(f"the cat sat on mat {i}\n" for i in range(40)))
    valid = write_text(tmp_path / "valid.txt", "a dog\n\nthe cat\n")
    test = write_text(tmp_path / "test.txt", "mat\n")
    ld = load_lm_data(local_lm_config(tmp_path, train_path=train, valid_path=valid, test_path=test))
    assert ld.num_documents == {"train": 40, "valid": 2, "test": 1}
    assert [ld.tokenizer.decode(d) for d in _documents(ld.streams["test"])] == ["mat"]
    # Same tokenizer, edited valid text: re-tokenised, not served from the stream cache.
    write_text(valid, "the mat\n")
    edited = load_lm_data(local_lm_config(tmp_path, train_path=train, valid_path=valid, test_path=test))
    assert edited.tokenizer.model_path == ld.tokenizer.model_path
    assert [edited.tokenizer.decode(d) for d in _documents(edited.streams["valid"])] == ["the mat"]


def test_local_error_missing_file(tmp_path):
    train = write_text(tmp_path / "train.txt", "some text\n")
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="data.valid_path") as e:
        load_lm_data(local_lm_config(tmp_path, train_path=train, valid_path=missing))
    assert str(missing) in str(e.value) and "not found" in str(e.value)
    with pytest.raises(DataError, match="data.train_path is required"):
        load_lm_data(_config(tmp_path, name="local"))


def test_local_error_not_utf8(tmp_path):
    train = write_text(tmp_path / "train.txt", "fine\n")
    bad = tmp_path / "test.txt"
    bad.write_bytes("ok\nçà\n".encode("utf-8") + b"caf\xe9\n")
    with pytest.raises(DataError, match="data.test_path") as e:
        load_lm_data(local_lm_config(tmp_path, train_path=train, test_path=bad))
    message = str(e.value)
    assert str(bad) in message and "line 3" in message and "UTF-8" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- hub corpora


def test_wikitext103_mapping_without_network(tmp_path, monkeypatch):
    raw = ["", " = Valkyria Chronicles = \n", "", " The game began in 2010 . \n",
           " = = Gameplay = = \n", " It is played in turns . \n", ""]
    calls = fake_hub(monkeypatch, {"train": {"text": raw * 5}, "validation": {"text": raw[:4]},
                                   "test": {"text": [" Senjō no Valkyria . \n", ""]}})
    ld = load_lm_data(_config(tmp_path, name="wikitext103", vocab_size=60))
    assert calls == [("wikitext", "wikitext-103-raw-v1")]
    # Empty lines dropped, headings kept, whitespace normalised.
    assert ld.num_documents == {"train": 20, "valid": 2, "test": 1}
    valid = [ld.tokenizer.decode(d) for d in _documents(ld.streams["valid"])]
    assert valid == ["= Valkyria Chronicles =", "The game began in 2010 ."]


def test_lm1b_valid_carved_from_train(tmp_path, monkeypatch):
    train = [f"sentence {i} of the news" for i in range(200)]
    calls = fake_hub(monkeypatch, {"train": {"text": train + [""]},
                                   "test": {"text": ["a test sentence"]}})
    ld = load_lm_data(_config(tmp_path, name="lm1b", vocab_size=60, num_valid=20))
    assert calls == [("lm1b", None)]
    assert ld.num_documents == {"train": 180, "valid": 20, "test": 1}
    decoded = {s: [ld.tokenizer.decode(d) for d in _documents(ld.streams[s])]
               for s in ("train", "valid")}
    assert not set(decoded["train"]) & set(decoded["valid"])
    assert sorted(decoded["train"] + decoded["valid"]) == sorted(train)
    again = load_lm_data(_config(tmp_path, name="lm1b", vocab_size=60, num_valid=20), seed=9)
    assert torch.equal(again.streams["valid"], ld.streams["valid"])  # not seed-dependent
    with pytest.raises(DataError, match="num_valid"):
        load_lm_data(_config(tmp_path, name="lm1b", vocab_size=60, num_valid=500))
