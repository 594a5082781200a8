"""The built-in corpora, generated from a seed (no network): their registry and their cache files.

    builtin            number phrases, quantities and dates (``data.synthetic``)
    builtin_sentences  whole sentences built around them (``data.sentences``)

The sentences are built from the phrases (``data.sentences`` imports ``data.synthetic``'s words);
nothing imports back, and this module is the one place that knows both generators.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import sentences, synthetic
from .files import write_then_rename

# data.name -> (its generate_splits, its GENERATOR_VERSION: bumped when the output changes).
GENERATORS = {
    "builtin": (synthetic.generate_splits, synthetic.GENERATOR_VERSION),
    "builtin_sentences": (sentences.generate_splits, sentences.GENERATOR_VERSION),
}


def builtin_params_hash(num_train: int, num_valid: int, num_test: int, seed: int,
                        name: str = "builtin") -> str:
    params = {"version": GENERATORS[name][1], "num_train": num_train,
              "num_valid": num_valid, "num_test": num_test, "seed": seed}
    if name != "builtin":  # the phrases keep the directory they always had
        params["name"] = name
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def write_builtin_jsonl(cache_dir: str | os.PathLike, num_train: int, num_valid: int,
                        num_test: int, seed: int, name: str = "builtin") -> dict[str, str]:
    """Write the splits of built-in corpus `name` (see the module docstring) as JSONL under
    cache_dir, only if missing; return split -> path."""
    digest = builtin_params_hash(num_train, num_valid, num_test, seed, name)
    directory = Path(cache_dir) / f"{name}-{digest}"
    paths = {split: str(directory / f"{split}.jsonl") for split in ("train", "valid", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    for split, pairs in GENERATORS[name][0](num_train, num_valid, num_test, seed).items():
        lines = "".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in pairs)
        write_then_rename(paths[split], lambda f: f.write(lines.encode("utf-8")))
    return paths
