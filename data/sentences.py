"""The built-in English->French sentence task (`data.name=builtin_sentences`): a harder one.

`data.synthetic`'s phrases (numbers, dates, quantities alone) saturate: every optimizer ends at
95-98 BLEU. Here the same phrases are parts of whole sentences, so a model must also learn

* agreement: French adjectives, articles and numerals agree in gender and number with their noun
  ("three small red boxes" -> "trois petites boîtes rouges", "twenty-one" -> "vingt et une"
  before a feminine noun), verbs with their subject (a coordinated subject is plural);
* word order: most adjectives follow the noun, a few precede it; "not" becomes "ne ... pas"
  around the verb, or around the auxiliary in the past;
* tense: present, past (passé composé) and future, each with its own irregular forms;
* formats: 12-hour clock times become 24-hour ones ("7:45 pm" -> "19 h 45"), decimal points
  commas, "$3.99" "3,99 dollars", thousands separators spaces;
* elision: "le" and "la" become "l'" before a vowel, "ne" "n'".

Held-out compositions: a fixed set of (adjective, noun) pairs never appears in training. Half of
the valid and test sentences contain one, so those splits measure generalisation to new
combinations, not memorisation. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random

from .synthetic import (_EN_MONTHS, _EN_WEEKDAYS, _FR_MONTHS, _FR_WEEKDAYS, _fr_day,
                        _sample_date, english_digits, english_number, french_digits,
                        french_number)

# Bump when the output changes, so cached files are not reused.
GENERATOR_VERSION = 1

# (English singular, English plural, French singular, French plural, feminine)
_NOUNS = [
    ("cat", "cats", "chat", "chats", False),
    ("dog", "dogs", "chien", "chiens", False),
    ("book", "books", "livre", "livres", False),
    ("tree", "trees", "arbre", "arbres", False),
    ("train", "trains", "train", "trains", False),
    ("student", "students", "étudiant", "étudiants", False),
    ("boy", "boys", "garçon", "garçons", False),
    ("horse", "horses", "cheval", "chevaux", False),
    ("house", "houses", "maison", "maisons", True),
    ("car", "cars", "voiture", "voitures", True),
    ("table", "tables", "table", "tables", True),
    ("girl", "girls", "fille", "filles", True),
    ("apple", "apples", "pomme", "pommes", True),
    ("box", "boxes", "boîte", "boîtes", True),
    ("letter", "letters", "lettre", "lettres", True),
    ("island", "islands", "île", "îles", True),
]
# (English, French masculine singular, feminine singular, masculine plural, feminine plural,
# before the noun in French)
_ADJECTIVES = [
    ("small", "petit", "petite", "petits", "petites", True),
    ("big", "grand", "grande", "grands", "grandes", True),
    ("young", "jeune", "jeune", "jeunes", "jeunes", True),
    ("pretty", "joli", "jolie", "jolis", "jolies", True),
    ("red", "rouge", "rouge", "rouges", "rouges", False),
    ("green", "vert", "verte", "verts", "vertes", False),
    ("blue", "bleu", "bleue", "bleus", "bleues", False),
    ("black", "noir", "noire", "noirs", "noires", False),
    ("white", "blanc", "blanche", "blancs", "blanches", False),
    ("heavy", "lourd", "lourde", "lourds", "lourdes", False),
    ("expensive", "cher", "chère", "chers", "chères", False),
    ("happy", "heureux", "heureuse", "heureux", "heureuses", False),
]
# English: 3rd singular present, plain form, past. French: 3rd singular and plural present,
# past participle (with avoir), 3rd singular and plural future.
_VERBS = [
    (("sees", "see", "saw"), ("voit", "voient", "vu", "verra", "verront")),
    (("buys", "buy", "bought"), ("achète", "achètent", "acheté", "achètera", "achèteront")),
    (("finds", "find", "found"), ("trouve", "trouvent", "trouvé", "trouvera", "trouveront")),
    (("sells", "sell", "sold"), ("vend", "vendent", "vendu", "vendra", "vendront")),
    (("carries", "carry", "carried"), ("porte", "portent", "porté", "portera", "porteront")),
    (("wants", "want", "wanted"), ("veut", "veulent", "voulu", "voudra", "voudront")),
    (("paints", "paint", "painted"), ("peint", "peignent", "peint", "peindra", "peindront")),
    (("takes", "take", "took"), ("prend", "prennent", "pris", "prendra", "prendront")),
]
_CITIES = [("Paris", "Paris"), ("London", "Londres"), ("Rome", "Rome"), ("Geneva", "Genève"),
           ("Brussels", "Bruxelles"), ("Montreal", "Montréal"), ("Lyon", "Lyon"),
           ("Berlin", "Berlin")]
_NAMES = ["Marie", "Paul", "Claire", "Hugo", "Emma", "Louis", "Alice", "Jules"]
_VOWELS = tuple("aeiouhéèêîô")

# Every fifth (adjective, noun) pair, in a fixed interleaving: 16 x 12 / 5 ~ 38 compositions
# that training never sees.
HELD_OUT = frozenset((a, n) for n in range(len(_NOUNS)) for a in range(len(_ADJECTIVES))
                     if (3 * n + a) % 5 == 0)


class _Sentence:
    """One pair being built: its English and French words, and its (adjective, noun) pairs."""

    def __init__(self) -> None:
        self.en: list[str] = []
        self.fr: list[str] = []
        self.pairs: set[tuple[int, int]] = set()


def _noun_phrase(rng: random.Random, s: _Sentence, plural: bool, count: int | None = None
                 ) -> tuple[list[str], list[str]]:
    """(English, French) words of a noun phrase with 0-2 adjectives, "the ..." or a count."""
    noun = rng.randrange(len(_NOUNS))
    en_one, en_many, fr_one, fr_many, feminine = _NOUNS[noun]
    before = [a for a in range(len(_ADJECTIVES)) if _ADJECTIVES[a][5]]
    after = [a for a in range(len(_ADJECTIVES)) if not _ADJECTIVES[a][5]]
    chosen = []
    if rng.random() < 0.6:
        chosen.append(rng.choice(before))
    if rng.random() < 0.6:
        chosen.append(rng.choice(after))
    s.pairs.update((a, noun) for a in chosen)
    form = 2 * plural + feminine + 1  # index of the agreeing French form
    fr_before = [_ADJECTIVES[a][form] for a in chosen if _ADJECTIVES[a][5]]
    fr_after = [_ADJECTIVES[a][form] for a in chosen if not _ADJECTIVES[a][5]]
    en = [_ADJECTIVES[a][0] for a in chosen] + [en_many if plural else en_one]
    fr = fr_before + [fr_many if plural else fr_one] + fr_after
    if count is None:
        return ["the"] + en, ["les" if plural else ("la" if feminine else "le")] + fr
    if rng.random() < 0.7:
        en_count, fr_count = english_number(count), french_number(count)
        if feminine and (fr_count == "un" or fr_count.endswith((" un", "-un"))):
            fr_count += "e"  # "vingt et une pommes", "une pomme"
    else:
        en_count, fr_count = english_digits(count), french_digits(count)
    return [en_count] + en, [fr_count] + fr


def _count(rng: random.Random) -> int:
    return rng.choice([1, 1, 2, 3, rng.randint(2, 20), rng.randint(21, 99), rng.randint(100, 999),
                       rng.randint(1000, 99_999)])


def _subject(rng: random.Random, s: _Sentence) -> bool:
    """Append a subject; return whether it is plural."""
    kind = rng.random()
    if kind < 0.15:
        name = rng.choice(_NAMES)
        s.en.append(name)
        s.fr.append(name)
        return False
    if kind < 0.3:  # two coordinated noun phrases: a plural subject
        en1, fr1 = _noun_phrase(rng, s, rng.random() < 0.5)
        en2, fr2 = _noun_phrase(rng, s, rng.random() < 0.5)
        s.en += en1 + ["and"] + en2
        s.fr += fr1 + ["et"] + fr2
        return True
    plural = rng.random() < 0.4
    en, fr = _noun_phrase(rng, s, plural)
    s.en += en
    s.fr += fr
    return plural


def _verb_phrase(rng: random.Random, s: _Sentence, plural: bool) -> None:
    (en_3sg, en_plain, en_past), (fr_3sg, fr_3pl, fr_part, fr_fut, fr_fut_pl) = rng.choice(_VERBS)
    tense = rng.choice(("present", "past", "future"))
    negative = rng.random() < 0.25
    if tense == "present":
        en = ([("do" if plural else "does"), "not", en_plain] if negative
              else [en_plain if plural else en_3sg])
        fr = [fr_3pl if plural else fr_3sg]
    elif tense == "past":
        en = ["did", "not", en_plain] if negative else [en_past]
        fr = ["ont" if plural else "a", fr_part]
    else:
        en = ["will", "not", en_plain] if negative else ["will", en_plain]
        fr = [fr_fut_pl if plural else fr_fut]
    if negative:  # "ne" before the (auxiliary) verb, "pas" after it
        fr = ["ne", fr[0], "pas"] + fr[1:]
    s.en += en
    s.fr += fr


def _object(rng: random.Random, s: _Sentence) -> None:
    if rng.random() < 0.5:
        count = _count(rng)
        en, fr = _noun_phrase(rng, s, count != 1, count)
    else:
        en, fr = _noun_phrase(rng, s, rng.random() < 0.4)
    s.en += en
    s.fr += fr


def _price(rng: random.Random) -> tuple[list[str], list[str]]:
    cents = rng.randint(1, 99_999)
    value = f"{cents // 100}.{cents % 100:02d}"
    fr_value = value.replace(".", ",")
    if rng.random() < 0.5:
        return ["for", f"${value}"], ["pour", fr_value, "dollars"]
    return ["for", value, "euros"], ["pour", fr_value, "euros"]


def _time(rng: random.Random) -> tuple[list[str], list[str]]:
    hour, minute = rng.randrange(24), rng.randrange(0, 60, 5)
    twelve = hour % 12 or 12
    return (["at", f"{twelve}:{minute:02d}", "am" if hour < 12 else "pm"],
            ["à", f"{hour} h {minute:02d}"])


def _date(rng: random.Random) -> tuple[list[str], list[str]]:
    d = _sample_date(rng)
    month_en, month_fr = _EN_MONTHS[d.month - 1], _FR_MONTHS[d.month - 1]
    if rng.random() < 0.5:
        return (["on", f"{_EN_WEEKDAYS[d.weekday()]},", month_en, f"{d.day},", str(d.year)],
                ["le", _FR_WEEKDAYS[d.weekday()], _fr_day(d.day), month_fr, str(d.year)])
    return ["on", month_en, str(d.day)], ["le", _fr_day(d.day), month_fr]


def _place(rng: random.Random) -> tuple[list[str], list[str]]:
    en, fr = rng.choice(_CITIES)
    return ["in", en], ["à", fr]


def _weight_or_cost(rng: random.Random, s: _Sentence, plural: bool) -> None:
    if rng.random() < 0.5:
        kilos = rng.randint(1, 9999) / 10
        s.en += ["weigh" if plural else "weighs", f"{kilos:g}", "kilograms"]
        s.fr += ["pèsent" if plural else "pèse", f"{kilos:g}".replace(".", ","), "kilogrammes"]
    else:
        euros = rng.randint(2, 999_999)
        s.en += ["cost" if plural else "costs", english_digits(euros), "euros"]
        s.fr += ["coûtent" if plural else "coûte", french_digits(euros), "euros"]


def _elide(words: list[str]) -> list[str]:
    """French elision: le/la/ne before a vowel or mute h become l'/n', joined to the next word."""
    out: list[str] = []
    for word in words:
        if out and out[-1] in ("le", "la", "ne") and word.lower().startswith(_VOWELS):
            word = out.pop()[0] + "'" + word
        out.append(word)
    return out


def _finish(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def sample_pair(rng: random.Random) -> tuple[str, str, frozenset]:
    """One (English, French) sentence pair and the (adjective, noun) pairs it uses."""
    s = _Sentence()
    adjuncts = [f(rng) for f in (_date, _time, _place) if rng.random() < 0.3]
    if adjuncts and rng.random() < 0.5:  # an adjunct first: "On March 3, the cat ..."
        en, fr = adjuncts.pop(0)
        s.en += en[:-1] + [en[-1] + ","]
        s.fr += fr[:-1] + [fr[-1] + ","]
    plural = _subject(rng, s)
    if rng.random() < 0.2:
        _weight_or_cost(rng, s, plural)
    else:
        _verb_phrase(rng, s, plural)
        _object(rng, s)
        if rng.random() < 0.3:
            en, fr = _price(rng)
            s.en += en
            s.fr += fr
    for en, fr in adjuncts:
        s.en += en
        s.fr += fr
    return _finish(s.en), _finish(_elide(s.fr)), frozenset(s.pairs)


def generate_splits(num_train: int, num_valid: int, num_test: int, seed: int
                    ) -> dict[str, list[tuple[str, str]]]:
    """Disjoint splits. Train never uses a `HELD_OUT` (adjective, noun) pair; every other valid
    and test sentence uses one, the rest none."""
    rng = random.Random(f"sm3-sentences-v{GENERATOR_VERSION}:{seed}")
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, size in (("train", num_train), ("valid", num_valid), ("test", num_test)):
        pairs: list[tuple[str, str]] = []
        attempts = 0
        while len(pairs) < size:
            attempts += 1
            if attempts > 200 * size + 1000:
                raise ValueError(f"could not generate {size} distinct {split} pairs")
            source, target, used = sample_pair(rng)
            novel = bool(used & HELD_OUT)
            wanted = split != "train" and len(pairs) % 2 == 0
            if source in seen or novel != wanted:
                continue
            seen.add(source)
            pairs.append((source, target))
        splits[split] = pairs
    return splits
