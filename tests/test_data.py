"""Tests for data/: the built-in task, corpus readers, SentencePiece caching, batching."""

import dataclasses
import json
import logging
import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from data import Batch, DataConfig, DataError, LMDataConfig, load_lm_data, load_translation_data
from data.builtin import write_builtin_jsonl
from data.corpus import normalize_text, read_jsonl_splits, read_local_corpus
from data.synthetic import (english_number, english_ordinal_suffix, english_ordinal_words,
                            french_number, generate_pairs, generate_splits)
from tests.helpers_data import (count_tokenizer_trainings, fake_hub, local_lm_config,
                                local_translation_config, write_text)

# --------------------------------------------------------------------------- number words

FRENCH = {
    0: "zéro", 1: "un", 16: "seize", 17: "dix-sept", 19: "dix-neuf", 20: "vingt",
    21: "vingt et un", 22: "vingt-deux", 31: "trente et un", 61: "soixante et un",
    70: "soixante-dix", 71: "soixante et onze", 72: "soixante-douze", 77: "soixante-dix-sept",
    80: "quatre-vingts", 81: "quatre-vingt-un", 89: "quatre-vingt-neuf", 90: "quatre-vingt-dix",
    91: "quatre-vingt-onze", 99: "quatre-vingt-dix-neuf", 100: "cent", 101: "cent un",
    180: "cent quatre-vingts", 200: "deux cents", 201: "deux cent un",
    342: "trois cent quarante-deux", 1000: "mille", 1001: "mille un", 2000: "deux mille",
    1999: "mille neuf cent quatre-vingt-dix-neuf", 21000: "vingt et un mille",
    80000: "quatre-vingt mille", 80080: "quatre-vingt mille quatre-vingts",
    200000: "deux cent mille", 200200: "deux cent mille deux cents",
    1_000_000: "un million", 2_000_000: "deux millions", 80_000_000: "quatre-vingts millions",
    200_000_000: "deux cents millions", 1_200_000: "un million deux cent mille",
}


@pytest.mark.parametrize("n, words", sorted(FRENCH.items()))
def test_french_number_words(n, words):
    assert french_number(n) == words


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (15, "fifteen"), (42, "forty-two"), (342, "three hundred forty-two"),
    (1234, "one thousand two hundred thirty-four"), (2_000_005, "two million five"),
])
def test_english_number_words(n, words):
    assert english_number(n) == words


def test_english_ordinals():
    assert [english_ordinal_suffix(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]
    assert [english_ordinal_words(n) for n in (1, 2, 3, 5, 9, 12, 20, 21, 30, 31)] == [
        "first", "second", "third", "fifth", "ninth", "twelfth", "twentieth", "twenty-first",
        "thirtieth", "thirty-first"]


def test_number_range_checked():
    with pytest.raises(ValueError):
        french_number(-1)
    with pytest.raises(ValueError):
        english_number(10**9)


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seeded():
    assert generate_pairs(300, seed=5) == generate_pairs(300, seed=5)
    assert generate_pairs(300, seed=5) != generate_pairs(300, seed=6)


def test_generated_splits_are_disjoint():
    splits = generate_splits(2000, 200, 200, seed=1)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [2000, 200, 200]
    train, valid, test = ({source for source, _ in splits[s]} for s in ("train", "valid", "test"))
    assert len(train) == 2000 and not (train & test) and not (train & valid) and not (valid & test)


def test_generated_pairs_look_right():
    pairs = dict(generate_pairs(3000, seed=0))
    dates = [(s, t) for s, t in pairs.items() if s.startswith("the ") and " of " in s]
    assert dates and all(t.startswith("le ") for _, t in dates)
    # Plain word numerals must match french_number of the value they spell.
    by_words = {english_number(n): french_number(n) for n in range(0, 2000)}
    matched = [(s, t) for s, t in pairs.items() if s in by_words]
    assert matched and all(by_words[s] == t for s, t in matched)


def test_builtin_files_written_once(tmp_path):
    paths = write_builtin_jsonl(tmp_path, 50, 10, 10, seed=0)
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths.values()}
    assert write_builtin_jsonl(tmp_path, 50, 10, 10, seed=0) == paths
    assert {p: os.stat(p).st_mtime_ns for p in paths.values()} == mtimes
    assert write_builtin_jsonl(tmp_path, 51, 10, 10, seed=0)["train"] != paths["train"]
    with open(paths["train"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 50 and all(set(r) == {"source", "target"} for r in records)


def test_builtin_files_read_back_as_datasets_reads_them(tmp_path):
    """The built-in corpora skip `datasets` (its import is ~2 s of every start) and read what its JSON
    loader reads, whitespace normalised."""
    import datasets

    paths = write_builtin_jsonl(tmp_path, 300, 20, 20, seed=0, name="builtin_sentences")
    loaded = datasets.load_dataset("json", data_files=paths, cache_dir=str(tmp_path / "hf"))
    read = read_jsonl_splits(paths)
    for split in paths:
        assert read[split] == ([normalize_text(t) for t in loaded[split]["source"]],
                               [normalize_text(t) for t in loaded[split]["target"]])


@pytest.mark.parametrize("load", ["translation", "language modelling"])
def test_builtin_data_loads_without_datasets(tmp_path, monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", None)  # any `import datasets` now fails
    if load == "translation":
        data = load_translation_data(DataConfig(num_train=100, num_valid=10, num_test=10, vocab_size=100,
                                                cache_dir=str(tmp_path)), seed=0)
        assert len(data.sources["train"]) == 100
    else:
        data = load_lm_data(LMDataConfig(num_train=100, num_valid=10, num_test=10, vocab_size=100,
                                         cache_dir=str(tmp_path)), seed=0)
        assert data.num_documents["train"] == 200


# --------------------------------------------------------------------------- builtin load


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    cfg = DataConfig(num_train=2000, num_valid=100, num_test=100, vocab_size=300,
                     max_tokens=512, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_translation_data(cfg, seed=0)


def test_builtin_load(builtin):
    td = builtin
    assert [len(td.sources[s]) for s in ("train", "valid", "test")] == [2000, 100, 100]
    assert all(len(td.sources[s]) == len(td.targets[s]) for s in td.sources)
    assert not set(td.sources["test"]) & set(td.sources["train"])
    tok = td.tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 50 < tok.vocab_size <= 300
    assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(1) == "<unk>"


def test_tokenizer_round_trip(builtin):
    tok = builtin.tokenizer
    for split in ("train", "test"):
        for text in builtin.sources[split][:200] + builtin.targets[split][:200]:
            ids = tok.encode(text)
            assert ids and tok.bos_id not in ids and tok.eos_id not in ids
            assert tok.decode(ids) == text
            # decode drops specials and accepts tensors
            assert tok.decode(torch.tensor([tok.bos_id, *ids, tok.eos_id, tok.pad_id])) == text


def test_tokenizer_cached_and_deterministic(tmp_path, monkeypatch):
    trainings = count_tokenizer_trainings(monkeypatch)
    cfg = DataConfig(num_train=300, num_valid=20, num_test=20, vocab_size=120,
                     cache_dir=str(tmp_path / "a"))
    first = load_translation_data(cfg)
    assert len(trainings) == 1
    mtime = os.stat(first.tokenizer.model_path).st_mtime_ns
    second = load_translation_data(cfg)
    assert len(trainings) == 1  # reused, not retrained
    assert second.tokenizer.model_path == first.tokenizer.model_path
    assert os.stat(second.tokenizer.model_path).st_mtime_ns == mtime
    # A fresh cache trains again and must produce the identical model.
    other = load_translation_data(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "b")}))
    assert len(trainings) == 2
    with open(first.tokenizer.model_path, "rb") as a, open(other.tokenizer.model_path, "rb") as b:
        assert a.read() == b.read()
    # Changing an option trains a new model.
    load_translation_data(DataConfig(**{**vars(cfg), "vocab_size": 100}))
    assert [t["vocab_size"] for t in trainings] == [120, 120, 100]


@pytest.mark.parametrize("model_type", ["bpe", "char", "word"])
def test_other_model_types(tmp_path, model_type):
    cfg = DataConfig(num_train=300, num_valid=20, num_test=20, vocab_size=200,
                     spm_model_type=model_type, cache_dir=str(tmp_path))
    td = load_translation_data(cfg)
    tok = td.tokenizer
    # A 200-word vocabulary cannot cover every word, so look only at fully known sentences.
    known = [t for t in td.sources["train"] if tok.unk_id not in tok.encode(t)]
    assert len(known) > 10
    assert all(tok.decode(tok.encode(text)) == text for text in known)


def test_accepts_dictconfig(tmp_path):
    schema = OmegaConf.structured(DataConfig(num_train=100, num_valid=10, num_test=10,
                                             vocab_size=100, cache_dir=str(tmp_path)))
    td = load_translation_data(schema, seed=1)
    assert len(td.sources["train"]) == 100 and td.config.vocab_size == 100


def test_bad_options(tmp_path):
    with pytest.raises(DataError, match="data.name"):
        load_translation_data(DataConfig(name="wmt99", cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="spm_model_type"):
        load_translation_data(DataConfig(num_train=50, num_valid=5, num_test=5,
                                         spm_model_type="wordpiece", cache_dir=str(tmp_path)))


def test_wmt14_mapping_without_network(tmp_path, monkeypatch):
    rows = [{"de": f"Satz {i}", "en": f"sentence {i}"} for i in range(40)]
    calls = fake_hub(monkeypatch, {"train": {"translation": rows},
                                   "validation": {"translation": rows[:5]},
                                   "test": {"translation": rows[5:10]}})
    td = load_translation_data(DataConfig(name="wmt14_en_de", target_lang="de", vocab_size=60,
                                          cache_dir=str(tmp_path)))
    assert calls == [("wmt14", "de-en")]
    assert td.sources["train"][3] == "sentence 3" and td.targets["train"][3] == "Satz 3"
    assert td.sources["test"][0] == "sentence 5" and len(td.sources["valid"]) == 5
    with pytest.raises(DataError, match="target_lang"):  # en_de with the default target fr
        load_translation_data(DataConfig(name="wmt14_en_de", cache_dir=str(tmp_path)))


# --------------------------------------------------------------------------- batching


def test_batches_respect_max_tokens_and_shapes(builtin):
    td = builtin
    for max_tokens in (64, 512, 2048):
        batches = td.batches("train", max_tokens=max_tokens)
        for b in batches:
            assert isinstance(b, Batch)
            B = b.src.shape[0]
            assert B == len(b.indices) == b.tgt_in.shape[0] == b.tgt_out.shape[0]
            assert B * max(b.src.shape[1], b.tgt_in.shape[1]) <= max_tokens
            assert b.tgt_in.shape == b.tgt_out.shape and b.src.dtype == torch.long
            assert b.num_tokens == int((b.tgt_out != td.tokenizer.pad_id).sum())


def test_batch_contents(builtin):
    td, tok = builtin, builtin.tokenizer
    batch = td.batches("valid", shuffle=False)[0]
    for row, i in enumerate(batch.indices):
        src = batch.src[row].tolist()
        tgt_in, tgt_out = batch.tgt_in[row].tolist(), batch.tgt_out[row].tolist()
        source_ids, target_ids = tok.encode(td.sources["valid"][i]), tok.encode(td.targets["valid"][i])
        n, m = len(source_ids), len(target_ids)
        assert src[:n + 1] == source_ids + [tok.eos_id] and set(src[n + 1:]) <= {tok.pad_id}
        assert tgt_in[:m + 1] == [tok.bos_id] + target_ids
        assert tgt_out[:m + 1] == target_ids + [tok.eos_id]
        assert set(tgt_in[m + 1:]) <= {tok.pad_id} and set(tgt_out[m + 1:]) <= {tok.pad_id}
        assert tok.decode(src) == td.sources["valid"][i]


def test_batches_cover_each_example_once(builtin):
    for split in ("train", "valid"):
        for epoch in (0, 1):
            indices = [i for b in builtin.batches(split, epoch=epoch) for i in b.indices]
            assert sorted(indices) == list(range(len(builtin.sources[split])))


def test_batches_deterministic_per_seed_and_epoch(builtin):
    def order(td, epoch):
        return [b.indices for b in td.batches("train", epoch=epoch)]

    assert order(builtin, 0) == order(builtin, 0)
    assert order(builtin, 0) != order(builtin, 1)
    reseeded = type(builtin)(builtin.config, builtin.tokenizer, builtin.sources, builtin.targets,
                             seed=1)
    assert order(reseeded, 0) != order(builtin, 0)
    # Unshuffled batches ignore the epoch and come in length order.
    plain = [b.indices for b in builtin.batches("train", epoch=3, shuffle=False)]
    assert plain == [b.indices for b in builtin.batches("train", epoch=7, shuffle=False)]
    widths = [max(b.src.shape[1], b.tgt_in.shape[1])
              for b in builtin.batches("train", shuffle=False)]
    assert widths == sorted(widths) and len(set(widths)) > 1


def test_batches_do_not_touch_global_rng(builtin):
    torch.manual_seed(0)
    import random
    random.seed(0)
    expected = (torch.rand(1).item(), random.random())
    torch.manual_seed(0)
    random.seed(0)
    builtin.batches("train", epoch=2)
    assert (torch.rand(1).item(), random.random()) == expected


def test_rank_sharding(builtin):
    full = builtin.batches("train", epoch=4, max_tokens=256)
    world = 3
    shards = [builtin.batches("train", epoch=4, max_tokens=256, rank=r, world_size=world)
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(full) // world
    seen = [tuple(b.indices) for s in shards for b in s]
    assert len(seen) == len(set(seen))  # disjoint
    examples = [i for batch in seen for i in batch]
    assert len(examples) == len(set(examples))
    assert set(seen) <= {tuple(b.indices) for b in full}
    assert [b.indices for b in shards[1]] == [b.indices for b in full[1:len(full) - len(full) % world:world]]
    with pytest.raises(ValueError):
        builtin.batches("train", rank=2, world_size=2)


def test_max_tokens_smaller_than_an_example(builtin):
    with pytest.raises(DataError, match="max_tokens"):
        builtin.batches("train", max_tokens=3)


# --------------------------------------------------------------------------- local corpora

SOURCES = [f"sentence number {i}" for i in range(30)]
TARGETS = [f"phrase numéro {i}" for i in range(30)]


def test_local_tsv_with_carved_splits(tmp_path, caplog):
    tsv = write_text(tmp_path / "train.tsv", "".join(f"{s}\t{t}\n" for s, t in zip(SOURCES, TARGETS)))
    with caplog.at_level(logging.INFO, logger="data"):
        td = load_translation_data(local_translation_config(tmp_path, train_path=tsv))
    assert [len(td.sources[s]) for s in ("train", "valid", "test")] == [24, 3, 3]
    assert "carved" in caplog.text
    everything = {s: t for split in td.sources for s, t in zip(td.sources[split], td.targets[split])}
    assert everything == dict(zip(SOURCES, TARGETS))  # a partition: nothing lost or duplicated
    again = load_translation_data(local_translation_config(tmp_path, train_path=tsv))
    assert again.sources == td.sources  # carving is deterministic


def test_local_jsonl_and_two_files(tmp_path):
    jsonl = write_text(tmp_path / "train.jsonl", "".join(
        json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
        for s, t in zip(SOURCES, TARGETS)))
    valid = write_text(tmp_path / "valid.jsonl", json.dumps({"en": "hello there", "fr": "salut"}) + "\n")
    src = write_text(tmp_path / "test.en", "one\ntwo\n")
    tgt = write_text(tmp_path / "test.fr", "un\ndeux\n")
    td = load_translation_data(local_translation_config(tmp_path, train_path=jsonl, valid_path=valid,
                                      test_path=src, test_target_path=tgt))
    assert td.sources["train"] == SOURCES and td.targets["train"] == TARGETS
    assert (td.sources["valid"], td.targets["valid"]) == (["hello there"], ["salut"])
    assert (td.sources["test"], td.targets["test"]) == (["one", "two"], ["un", "deux"])

    train_src = write_text(tmp_path / "train.en", "\n".join(SOURCES) + "\n")
    train_tgt = write_text(tmp_path / "train.fr", "\r\n".join(TARGETS))  # CRLF, no final newline
    td2 = load_translation_data(local_translation_config(tmp_path, train_path=train_src,
                                                         train_target_path=train_tgt))
    assert sum(len(td2.sources[s]) for s in td2.sources) == 30
    assert set(td2.targets["train"]) <= set(TARGETS)


def test_local_filtering_counts(tmp_path, caplog):
    long_source = " ".join(["word"] * 200)
    lines = [f"{s}\t{t}" for s, t in zip(SOURCES, TARGETS)]
    lines += ["\tno source", "no target\t", "", f"{long_source}\ttoo long"]
    tsv = write_text(tmp_path / "train.tsv", "\n".join(lines) + "\n")
    valid = write_text(tmp_path / "valid.tsv", "a b\tc d\n")
    with caplog.at_level(logging.INFO, logger="data"):
        td = load_translation_data(local_translation_config(tmp_path, train_path=tsv, valid_path=valid,
                                          test_path=valid))
    assert td.sources["train"] == SOURCES
    assert "train: dropped 3 empty pairs of 34" in caplog.text
    assert "train: dropped 1 of 31 pairs longer than max_len=128" in caplog.text


def test_max_valid_caps_eval_splits(tmp_path):
    cfg = DataConfig(num_train=100, num_valid=30, num_test=30, max_valid=7, vocab_size=100,
                     cache_dir=str(tmp_path))
    td = load_translation_data(cfg)
    assert (len(td.sources["train"]), len(td.sources["valid"]), len(td.sources["test"])) == (100, 7, 7)


def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match="data.train_path") as e:
        load_translation_data(local_translation_config(tmp_path, train_path=missing))
    assert str(missing) in str(e.value)
    with pytest.raises(DataError, match="data.train_path is required"):
        load_translation_data(DataConfig(name="local", cache_dir=str(tmp_path)))
    ok = write_text(tmp_path / "ok.en", "a\n")
    with pytest.raises(DataError, match="data.valid_target_path") as e:
        load_translation_data(local_translation_config(tmp_path, train_path=ok, train_target_path=ok,
                                     valid_path=ok, valid_target_path=tmp_path / "x.fr"))
    assert "x.fr" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\n \n\t\n"])
@pytest.mark.parametrize("load, config, name", [
    (load_translation_data, local_translation_config, "train.tsv"),
    (load_lm_data, local_lm_config, "train.txt"),
])
def test_error_empty_file(tmp_path, content, load, config, name):
    empty = write_text(tmp_path / name, content)
    with pytest.raises(DataError, match="data.train_path: file is empty") as e:
        load(config(tmp_path, train_path=empty))
    assert str(empty) in str(e.value)


def test_error_misaligned(tmp_path):
    src = write_text(tmp_path / "train.en", "a\nb\nc\n")
    tgt = write_text(tmp_path / "train.fr", "a\nb\n")
    with pytest.raises(DataError, match="not aligned") as e:
        load_translation_data(local_translation_config(tmp_path, train_path=src, train_target_path=tgt))
    message = str(e.value)
    assert str(src) in message and str(tgt) in message and "3 lines" in message and "2 lines" in message


def test_error_not_utf8(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_bytes("ok\tbien\nçà\tlà\n".encode("utf-8") + b"caf\xe9\tcaf\xc3\xa9\n")
    with pytest.raises(DataError, match="UTF-8") as e:
        load_translation_data(local_translation_config(tmp_path, train_path=bad))
    assert str(bad) in str(e.value) and "line 3" in str(e.value)


def test_error_malformed_lines(tmp_path):
    tsv = write_text(tmp_path / "train.tsv", "a\tb\nno tab here\n")
    with pytest.raises(DataError, match="line 2"):
        load_translation_data(local_translation_config(tmp_path, train_path=tsv))
    jsonl = write_text(tmp_path / "train.jsonl", '{"source": "a", "target": "b"}\n{"source": 1}\n')
    with pytest.raises(DataError, match="line 2"):
        load_translation_data(local_translation_config(tmp_path, train_path=jsonl))
    txt = write_text(tmp_path / "train.txt", "a\n")
    with pytest.raises(DataError, match="train_target_path"):
        load_translation_data(local_translation_config(tmp_path, train_path=txt))


def test_error_is_one_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"source": "a",\n "target": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_translation_data(local_translation_config(tmp_path, train_path=bad))
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


# --------------------------------------------------------------------------- property test

_line = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from(["\t", "{", "}", '"source"', '"target"',
                                                     ":", ",", '"', "\\u", "\\ud800", "\r", " "])),
    max_size=6).map("".join)


_text = st.text(max_size=10)  # may contain tabs, newlines, NUL, odd whitespace ...


def _encode(lines):
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@st.composite
def _corpus_files(draw):
    """(kind, [file bytes]): well-formed corpora, broken structure, or raw bytes."""
    kind = draw(st.sampled_from(["tsv", "jsonl", "two"]))
    style = draw(st.sampled_from(["structured", "structured", "lines", "bytes"]))
    pairs = draw(st.lists(st.tuples(_text, _text), max_size=12))
    if style == "bytes":
        payloads = [draw(st.binary(max_size=200)) for _ in range(2 if kind == "two" else 1)]
    elif style == "lines":
        payloads = [_encode(draw(st.lists(_line, max_size=8)))
                    for _ in range(2 if kind == "two" else 1)]
    elif kind == "tsv":
        payloads = [_encode(f"{s}\t{t}" for s, t in pairs)]
    elif kind == "jsonl":
        value = st.one_of(_text, _text, st.integers(), st.none())
        records = draw(st.lists(st.dictionaries(
            st.sampled_from(["source", "target", "en", "fr", "x"]), value), max_size=8))
        records += [{"source": s, "target": t} for s, t in pairs]
        payloads = [_encode(json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records)]
    else:
        payloads = [_encode(s for s, _ in pairs), _encode(t for _, t in pairs)]
    return kind, payloads


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_corpus_files())
def test_local_reader_loads_or_raises_data_error(files):
    kind, payloads = files
    with tempfile.TemporaryDirectory() as tmp:
        names = {"tsv": ["train.tsv"], "jsonl": ["train.jsonl"], "two": ["train.en", "train.fr"]}[kind]
        for name, payload in zip(names, payloads):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(payload)
        paths = {"train": (os.path.join(tmp, names[0]),
                           os.path.join(tmp, names[1]) if kind == "two" else None)}
        try:
            corpus = read_local_corpus(paths, num_valid=5, num_test=5)
        except DataError as e:
            assert "\n" not in str(e)
            return
        assert set(corpus) == {"train", "valid", "test"}
        for sources, targets in corpus.values():
            assert len(sources) == len(targets)
            for text in sources + targets:
                assert isinstance(text, str) and text == text.strip() and "\n" not in text
                text.encode("utf-8")  # no lone surrogates reach the tokenizer


# --------------------------------------------------------------------------- no network


def _offline_errors():
    """What `datasets.load_dataset` raises without network, in the installed versions."""
    import huggingface_hub.errors
    import requests

    return [
        ConnectionError("Couldn't reach 'wmt14' on the Hub (LocalEntryNotFoundError)"),
        huggingface_hub.errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode"),
        requests.exceptions.ConnectionError("Max retries exceeded with url: /datasets/wmt14"),
    ]


@pytest.mark.parametrize("error", _offline_errors(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("load, schema, name, hub_name, local_option", [
    (load_translation_data, DataConfig, "wmt14_en_fr", "'wmt14', 'fr-en'", "data=local"),
    (load_lm_data, LMDataConfig, "wikitext103", "'wikitext', 'wikitext-103-raw-v1'",
     "data=local_lm"),
    (load_lm_data, LMDataConfig, "lm1b", "'lm1b'", "data=local_lm"),
], ids=["wmt14_en_fr", "wikitext103", "lm1b"])
def test_hub_corpus_without_network_is_one_line_data_error(tmp_path, monkeypatch, error, load,
                                                           schema, name, hub_name, local_option):
    fake_hub(monkeypatch, error=error)
    with pytest.raises(DataError) as e:
        load(schema(name=name, cache_dir=str(tmp_path)))
    message = str(e.value)
    assert "\n" not in message and "could not download" in message
    hf_cache = os.path.join(str(tmp_path), "hf")
    assert f"datasets.load_dataset({hub_name}, cache_dir={hf_cache!r})" in message
    assert "HF_DATASETS_OFFLINE=1" in message and local_option in message


# --------------------------------------------------------------------------- vocabulary size


@pytest.mark.parametrize("load, config, line", [
    (load_translation_data, local_translation_config, "{i} cats\tchats {i}"),
    (load_lm_data, local_lm_config, "{i} cats"),
])
def test_vocab_size_larger_than_the_corpus_says_what_was_used(tmp_path, caplog, load, config,
                                                             line):
    train = write_text(tmp_path / ("train.tsv" if "\t" in line else "train.txt"),
                       "".join(line.format(i=i) + "\n" for i in range(60)))
    for attempt in ("trained", "cached"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="data"):
            loaded = load(dataclasses.replace(config(tmp_path, train_path=train), vocab_size=8000))
        pieces = loaded.tokenizer.vocab_size
        assert pieces == loaded.tokenizer._sp.get_piece_size() < 8000
        assert (f"data.vocab_size=8000 is more than this corpus supports; SentencePiece used "
                f"{pieces} pieces") in caplog.text, attempt
        assert "vocab 8000" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data"):
        load(dataclasses.replace(config(tmp_path, train_path=train), vocab_size=pieces))
    assert "more than this corpus supports" not in caplog.text
