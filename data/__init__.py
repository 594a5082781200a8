"""Translation data for the SM3 experiments: corpora, SentencePiece, token-budget batches.

    from data import DataConfig, load_translation_data
    td = load_translation_data(DataConfig(), seed=0)
    for batch in td.batches("train", epoch=0):
        ...
"""

from .batching import Batch
from .corpus import DataError
from .tokenizer import Tokenizer
from .translation import DataConfig, TranslationData, load_translation_data

__all__ = ["Batch", "DataConfig", "DataError", "Tokenizer", "TranslationData",
           "load_translation_data"]

# Language modelling: one token stream per split, cut into next-token windows.
from .lm import LMBatch, LMData, LMDataConfig, load_lm_data  # noqa: E402

__all__ += ["LMBatch", "LMData", "LMDataConfig", "load_lm_data"]
