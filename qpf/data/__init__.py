"""Tokenizers, corpora and the Grain input pipeline.

Typical use::

    from qpf.data import DataConfig, build_datasets
    data = build_datasets(DataConfig(corpus="tinyshakespeare", tokenizer="gpt2", seq_len=256))
    batch = next(data.train)            # {"tokens": int32 [B, T], "mask": bool [B, T]}
    for batch in data.eval_batches():   # + "target_bytes": int32 [B, T]
        ...
"""

from qpf.data.cache import TokenStream, cache_key, cached_stream, tokenize_docs
from qpf.data.corpora import (
    CORPUS_NAMES,
    Corpus,
    CorpusError,
    MissingDataError,
    load_corpus,
    pydoc_documents,
    tail_split,
)
from qpf.data.morphological import MorphConfig, MorphologicalTokenizer
from qpf.data.pipeline import (
    DataConfig,
    DataInfo,
    Datasets,
    bits_per_byte,
    build_datasets,
    gather,
    pack_windows,
    span_windows,
)
from qpf.data.tokenizers import (
    TOKENIZER_NAMES,
    ByteTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    get_tokenizer,
)

__all__ = [
    "CORPUS_NAMES",
    "TOKENIZER_NAMES",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "DataConfig",
    "DataInfo",
    "Datasets",
    "GPT2Tokenizer",
    "MissingDataError",
    "MorphConfig",
    "MorphologicalTokenizer",
    "TokenStream",
    "Tokenizer",
    "bits_per_byte",
    "build_datasets",
    "cache_key",
    "cached_stream",
    "gather",
    "get_tokenizer",
    "load_corpus",
    "pack_windows",
    "pydoc_documents",
    "span_windows",
    "tail_split",
    "tokenize_docs",
]
