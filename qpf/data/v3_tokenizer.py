"""The v3 original's ``BPETokenizer`` reproduced for faithful mode (spec v2_v3.md §B6).

Upstream stores each word as ONE string ``"<bos>word<eos>"`` without spaces between its
symbols, then counts pairs by splitting on whitespace, so it finds no pair and learns
**0 merges**: the result is a character tokenizer over the characters seen in training,
plus 5 specials. ``encode`` splits on whitespace and emits characters, so **spaces are
dropped**; unseen characters become ``<unk>``. ``decode`` concatenates and re-inserts a
space only at lower->Upper and letter<->digit boundaries. The default tokenizer of the
sane model is UTF-8 bytes (``qpf.data.tokenizers.ByteTokenizer``); this one exists so
the original's behaviour (and its information loss) can be reproduced and measured.

The specials' names are not given by the spec; their count (5) and position (first) are.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<mask>")


def count_pairs(words: Iterable[str]) -> Counter[tuple[str, str]]:
    """Upstream's pair count: symbols are the whitespace-separated parts of each stored
    word string; the strings have no spaces, so every word is one symbol (no pairs)."""
    pairs: Counter[tuple[str, str]] = Counter()
    for word in words:
        symbols = word.split()
        pairs.update(itertools.pairwise(symbols))
    return pairs


class V3CharTokenizer:
    """Faithful v3 tokenizer: specials, then every non-whitespace character seen (sorted)."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, chars: Sequence[str]):
        self.vocab = [*SPECIALS, *chars]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.merges: list[tuple[str, str]] = []
        self.vocab_size = len(self.vocab)
        digest = hashlib.sha256("".join(chars).encode()).hexdigest()[:8]
        self.name = f"v3char-{self.vocab_size}-{digest}"

    @classmethod
    def train(cls, texts: Iterable[str], num_merges: int = 1000) -> V3CharTokenizer:
        """Learn the vocabulary as upstream does; ``num_merges`` is honoured but no pair is
        ever found, so ``merges`` stays empty."""
        texts = list(texts)
        words = [f"<bos>{w}<eos>" for t in texts for w in t.split()]
        tok = cls(sorted({ch for t in texts for w in t.split() for ch in w}))
        for _ in range(num_merges):
            pairs = count_pairs(words)
            if not pairs:
                break
            tok.merges.append(pairs.most_common(1)[0][0])  # unreachable with upstream data
        return tok

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(ch, self.unk_id) for w in text.split() for ch in w]

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        out: list[str] = []
        for piece in pieces:
            if out and _boundary(out[-1][-1], piece[0]):
                out.append(" ")
            out.append(piece)
        return "".join(out)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """ids and UTF-8 bytes per token; dropped whitespace is charged to the next token."""
        ids, nbytes, pending = [], [], 0
        for ch in text:
            if ch.isspace():
                pending += len(ch.encode())
                continue
            ids.append(self.ids.get(ch, self.unk_id))
            nbytes.append(len(ch.encode()) + pending)
            pending = 0
        return np.asarray(ids, np.int32), np.asarray(nbytes, np.int32)


def _boundary(prev: str, nxt: str) -> bool:
    """Upstream's space re-insertion: lower->Upper, letter->digit or digit->letter."""
    if prev.islower() and nxt.isupper():
        return True
    return (prev.isalpha() and nxt.isdigit()) or (prev.isdigit() and nxt.isalpha())
