"""Tokenize a document list once and keep the ids on disk (``.npy``, memory-mapped on load).

The key hashes the corpus name, the split, the sha256 of the split's text and the
tokenizer's ``name`` (which encodes its settings). The original keyed its cache on the
tokenizer kind only, so a changed dataset or tokenizer silently reused stale ids (spec §13).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qpf.data.tokenizers import Tokenizer

CACHE_VERSION = 1  # bump when the on-disk layout or the stream construction changes


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Documents as one id stream, each document followed by EOS.

    tokens: int32 ``[N]`` (or ``[N, 3]`` for the morphological tokenizer).
    nbytes: int32 ``[N]``, source UTF-8 bytes per token (0 for the EOS separators).
    docs:   int64 ``[D, 2]``, (start, end) of each document's tokens, EOS excluded.
    """

    tokens: np.ndarray
    nbytes: np.ndarray
    docs: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def cache_key(corpus: str, split: str, text_sha256: str, tokenizer_name: str) -> str:
    """A filesystem-safe key; any change of its inputs changes it."""
    payload = json.dumps(
        {
            "v": CACHE_VERSION,
            "corpus": corpus,
            "split": split,
            "sha256": text_sha256,
            "tokenizer": tokenizer_name,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _eos_row(tok: Tokenizer, like: np.ndarray) -> np.ndarray:
    if like.ndim == 2:  # morphological: eos root with null affixes
        return np.array([[tok.eos_id, tok.null_affix_id, tok.null_affix_id]], np.int32)
    return np.array([tok.eos_id], np.int32)


def _encode_all(docs: list[str], tok: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    if hasattr(tok, "encode_batch"):  # tiktoken: batch encode is much faster
        out = []
        for ids in tok.encode_batch(docs):
            arr = np.asarray(ids, dtype=np.int32)
            out.append((arr, tok.token_bytes(arr)))
        return out
    return [tok.encode_with_bytes(d) for d in docs]


def tokenize_docs(docs: list[str], tok: Tokenizer) -> TokenStream:
    """Encode documents and join them, each followed by one EOS token."""
    parts, nbytes, bounds, pos = [], [], [], 0
    for ids, nb in _encode_all(docs, tok):
        ids = ids.astype(np.int32)
        bounds.append((pos, pos + len(ids)))
        parts += [ids, _eos_row(tok, ids) if ids.size else np.zeros((0,), np.int32)]
        nbytes += [nb.astype(np.int32), np.zeros(1 if ids.size else 0, np.int32)]
        pos += len(ids) + (1 if ids.size else 0)
    parts = [p for p in parts if p.size] or [np.zeros((0,), np.int32)]
    return TokenStream(
        tokens=np.concatenate(parts),
        nbytes=np.concatenate(nbytes) if nbytes else np.zeros(0, np.int32),
        docs=np.asarray(bounds, dtype=np.int64).reshape(-1, 2),
    )


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def cached_stream(docs: list[str], tok: Tokenizer, cache_dir: Path | None, key: str) -> TokenStream:
    """The token stream of ``docs``: loaded (memory-mapped) from the cache, else built and saved.

    ``cache_dir=None`` disables caching.
    """
    if cache_dir is None:
        return tokenize_docs(docs, tok)
    folder = cache_dir / "tokens" / key
    names = ("tokens", "nbytes", "docs")
    if all((folder / f"{n}.npy").is_file() for n in names):
        arrays = [np.load(folder / f"{n}.npy", mmap_mode="r") for n in names]
        return TokenStream(*arrays)
    stream = tokenize_docs(docs, tok)
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        _save_atomic(folder / f"{n}.npy", getattr(stream, n))
    return stream
