"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken), UTF-8 bytes, morphological.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id`` (and ``pad_id``/``bos_id`` where they exist) and a stable ``name`` that includes
its settings; the token cache uses ``name`` in its key, so two tokenizers that can produce
different ids must never share a name.

``encode_with_bytes`` additionally returns, per token, the number of UTF-8 bytes of the
source text that the token accounts for. Summed over the predicted targets it gives the
denominator of bits-per-byte, comparable across tokenizers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The regex GPT-2 splits text with before BPE (tiktoken_ext/openai_public.py, "gpt2").
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every tokenizer implements (special ids may be None)."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...


# ----------------------------------------------------------------------------- GPT-2


def _tiktoken_gpt2(ranks_file: Path | None):
    """tiktoken's own GPT-2 encoding (downloaded once into its cache), or ``MissingDataError``
    naming the ranks file and where to put it when that is impossible (``QPF_OFFLINE=1``
    forbids the download)."""
    import tiktoken

    from qpf.data.corpora import MissingDataError

    where = str(ranks_file) if ranks_file is not None else "DATA_DIR/gpt2/gpt2.tiktoken"
    hint = (
        f"put the GPT-2 ranks file gpt2.tiktoken at {where} (the data folder is --data-dir "
        "or QPF_DATA_DIR; ../shared/data/gpt2/gpt2.tiktoken has it), or use --tokenizer byte"
    )
    if os.environ.get("QPF_OFFLINE") == "1":
        raise MissingDataError(f"GPT-2 ranks not found and QPF_OFFLINE=1: {hint}")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # requests/urllib errors when offline, blocked, or a bad cache
        why = " ".join(str(err).split())[:160]
        raise MissingDataError(
            f"GPT-2 ranks not found and tiktoken's download failed ({type(err).__name__}: "
            f"{why}): {hint}"
        ) from err


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken: vocab 50257, eos = pad = bos = 50256 (``<|endoftext|>``).

    The ranks come from ``DATA_DIR/gpt2/gpt2.tiktoken`` when that file exists, so no network
    access is needed; otherwise ``tiktoken.get_encoding("gpt2")`` fetches and caches them.
    ``encode`` treats ``<|endoftext|>`` in the text as ordinary characters (no specials are
    added); documents are separated by the pipeline inserting ``eos_id`` itself.
    """

    name = "gpt2"
    vocab_size = 50257
    eos_id = GPT2_EOT_ID
    pad_id = GPT2_EOT_ID
    bos_id = GPT2_EOT_ID

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        import tiktoken
        import tiktoken.load

        data_dir = data_dir or os.environ.get("QPF_DATA_DIR")
        ranks_file = Path(data_dir) / "gpt2" / "gpt2.tiktoken" if data_dir else None
        if ranks_file is not None and ranks_file.is_file():
            self._enc = tiktoken.Encoding(
                name="gpt2",
                pat_str=GPT2_PAT_STR,
                mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(ranks_file)),
                special_tokens={GPT2_EOT: GPT2_EOT_ID},
                explicit_n_vocab=self.vocab_size,
            )
        else:
            self._enc = _tiktoken_gpt2(ranks_file)
        # Byte length of every id, so per-token byte counts are one gather.
        self._nbytes = np.array(
            [len(self._enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)],
            dtype=np.int32,
        )
        self._nbytes[GPT2_EOT_ID] = 0  # the separator stands for no source text

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (tiktoken releases the GIL across threads)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=2)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def token_bytes(self, ids: np.ndarray) -> np.ndarray:
        """UTF-8 byte length of each id (0 for ``<|endoftext|>``); same shape as ``ids``."""
        return self._nbytes[np.asarray(ids)]

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.encode(text), dtype=np.int32)
        return ids, self.token_bytes(ids)


# ----------------------------------------------------------------------------- bytes


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus PAD 256, BOS 257, EOS 258 (vocab 259).

    ``encode_bytes``/``decode_bytes`` round-trip any byte string exactly, including invalid
    UTF-8; ``decode`` to ``str`` drops the specials and uses ``errors="replace"``.
    """

    name = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, ids: np.ndarray) -> np.ndarray:
        """1 for a byte id, 0 for a special; same shape as ``ids``."""
        ids = np.asarray(ids)
        return (ids < 256).astype(np.int32)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        return ids, np.ones_like(ids)


# ----------------------------------------------------------------------------- factory

TOKENIZER_NAMES = ("gpt2", "byte", "morphological")


def get_tokenizer(
    name: str,
    data_dir: str | os.PathLike | None = None,
    corpus_text: str | None = None,
    path: str | os.PathLike | None = None,
    **options: Any,
) -> Tokenizer:
    """Build a tokenizer by name.

    Args:
      name: one of ``TOKENIZER_NAMES`` ("bpe" is accepted as an alias of "gpt2").
      data_dir: folder holding ``gpt2/gpt2.tiktoken`` (GPT-2 works offline with it).
      corpus_text: text to learn the morphological vocabularies from.
      path: a saved morphological tokenizer (JSON) to load instead of learning one.
      **options: ``MorphConfig`` fields for the morphological tokenizer.
    """
    if name in ("gpt2", "bpe"):
        return GPT2Tokenizer(data_dir=data_dir)
    if name == "byte":
        return ByteTokenizer()
    if name == "morphological":
        from qpf.data.morphological import MorphConfig, MorphologicalTokenizer

        if path is not None:
            return MorphologicalTokenizer.load(path)
        if corpus_text is None:
            raise ValueError("the morphological tokenizer needs corpus_text (or path) to learn")
        return MorphologicalTokenizer.train(corpus_text, MorphConfig(**options))
    raise ValueError(f"unknown tokenizer {name!r}: valid names are {', '.join(TOKENIZER_NAMES)}")
