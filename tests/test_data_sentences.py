"""The built-in sentence task (data/sentences.py): agreement, word order, formats, held-out
compositions, and its place among the built-in corpora."""

import json
import random
import re

from data import DataConfig, load_translation_data
from data.sentences import _ADJECTIVES, _NOUNS, HELD_OUT, _elide, generate_splits, sample_pair
from data.builtin import write_builtin_jsonl


def _uses_held_out(source: str) -> bool:
    """Whether an English sentence has a held-out adjective in a held-out noun's phrase (the
    English puts every adjective before the noun, at most one other in between)."""
    return any(re.search(rf"\b{_ADJECTIVES[a][0]} (\w+ )?({_NOUNS[n][0]}|{_NOUNS[n][1]})\b", source)
               for a, n in HELD_OUT)


def test_splits_are_deterministic_disjoint_and_hold_out_compositions():
    splits = generate_splits(3000, 200, 200, seed=0)
    assert splits == generate_splits(3000, 200, 200, seed=0)
    assert splits != generate_splits(3000, 200, 200, seed=1)
    sources = {name: {s for s, _ in pairs} for name, pairs in splits.items()}
    assert [len(sources[s]) for s in ("train", "valid", "test")] == [3000, 200, 200]
    assert not (sources["train"] & sources["test"]) and not (sources["valid"] & sources["test"])
    # Training never uses a held-out (adjective, noun) pair; every other test sentence does.
    assert len(HELD_OUT) > 30
    assert not any(_uses_held_out(s) for s in sources["train"])
    assert [_uses_held_out(s) for s, _ in splits["test"]] == [i % 2 == 0 for i in range(200)]


def test_french_agreement_order_and_formats():
    pairs = [sample_pair(random.Random(i))[:2] for i in range(8000)]
    feminine_plural = "|".join(n[1] for n in _NOUNS if n[4])
    rules = {  # English pattern -> what the French must then contain; each rule must occur
        r" small red boxes": r"petites boîtes rouges",  # order and feminine plural agreement
        r"^The white girl ": r"^La fille blanche ",
        rf"\b(twenty|thirty|forty|fifty|sixty|eighty)-one (\w+ )?({feminine_plural})\b":
            r"\b(et une|-une) ",  # "vingt et une pommes", "quatre-vingt-une boîtes"
        r" did not buy ": r" n'(a|ont) pas acheté ",
        r" 7:45 pm": r" 19 h 45",
        r"\$\d+\.\d\d": r"\d+,\d\d dollars",
    }
    for english, french in rules.items():
        shown = [(s, t) for s, t in pairs if re.search(english, s)]
        assert shown, english
        assert all(re.search(french, t) for _, t in shown), (english, shown[:3])
    assert _elide(["le", "arbre", "ne", "achète", "la", "île"]) == ["l'arbre", "n'achète", "l'île"]


def test_builtin_sentences_loads_with_its_own_cache(tmp_path):
    phrases = write_builtin_jsonl(tmp_path, 50, 10, 10, seed=0)
    sentences = write_builtin_jsonl(tmp_path, 50, 10, 10, seed=0, name="builtin_sentences")
    assert phrases["train"] != sentences["train"]
    with open(sentences["train"], encoding="utf-8") as f:
        assert json.loads(f.readline())["target"].endswith(".")
    data = load_translation_data(DataConfig(name="builtin_sentences", num_train=400, num_valid=20,
                                            num_test=20, vocab_size=300, max_tokens=2048,
                                            cache_dir=str(tmp_path)))
    assert len(data) == 400 and len(data.sources["test"]) == 20
    assert data.batches("train")
