"""Morphological tokenizer: every word becomes (root, prefix, suffix) ids (spec §12.2).

The vocabularies are learned from a corpus with the original's algorithm:

* roots: whole words by descending frequency (freq >= min_freq, len >= min_root_len) up to
  ``word_priority_ratio * root_vocab_size`` words, then character n-grams (n = 3..7) of the
  ``top_k_words_for_ngrams`` most frequent words, weighted by word frequency, up to the size;
* affixes: prefixes/suffixes of length 1..max_affix_len that leave a stem of >= min_root_len
  characters, scored ``productivity + 2 * stems_in_root_vocab + 0.001 * freq`` (0 when fewer
  than ``min_affix_productivity`` distinct stems);
* parsing: the (prefix, root, suffix) split maximising
  ``1000 * [root known] + 10 * len(root) - len(prefix) - len(suffix)``.

Encoding gives an int array ``[T, 3]`` with columns (root, prefix, suffix). As in the
original, a root missing from the vocabulary becomes ``<unk>``, so decoding is lossy for
rare words and whitespace is normalised to single spaces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS, NULL = 0, 1, 2, 3, 4
PUNCT = tuple(".,!?:;'\"()[]{}")
# A word is a maximal run of non-space, non-punctuation characters; punctuation is split off
# into one token per character (the original's \S+ split followed by punctuation splitting).
_TOKEN_RE = re.compile(r"""[.,!?;:"'()\[\]{}]|[^\s.,!?;:"'()\[\]{}]+""")
_NO_SPACE_BEFORE = set(",.!?:;'\")]}")
_NO_SPACE_AFTER = set("([{\"'")


@dataclasses.dataclass(frozen=True)
class MorphConfig:
    """Settings of the morphological tokenizer (the original's defaults)."""

    root_vocab_size: int = 16000
    prefix_vocab_size: int = 512
    suffix_vocab_size: int = 512
    min_root_len: int = 3
    max_affix_len: int = 5
    min_freq: int = 5
    parse_cache_size: int = 100_000
    top_k_words_for_ngrams: int = 10_000
    min_affix_productivity: int = 3
    word_priority_ratio: float = 0.7


def split_words(text: str) -> list[str]:
    """Words and single punctuation characters, in order."""
    return _TOKEN_RE.findall(text)


def _learn_roots(counts: Counter[str], cfg: MorphConfig) -> list[str]:
    vocab = list(SPECIALS) + list(PUNCT)
    seen = set(vocab)
    word_budget = int(cfg.word_priority_ratio * cfg.root_vocab_size)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    added = 0
    for word, freq in ranked:
        if added >= word_budget or len(vocab) >= cfg.root_vocab_size:
            break
        if freq >= cfg.min_freq and len(word) >= cfg.min_root_len and word not in seen:
            vocab.append(word)
            seen.add(word)
            added += 1
    ngrams: Counter[str] = Counter()
    for word, freq in ranked[: cfg.top_k_words_for_ngrams]:
        for n in range(3, 8):
            for i in range(len(word) - n + 1):
                gram = word[i : i + n]
                if gram not in seen:
                    ngrams[gram] += freq
    for gram, freq in sorted(ngrams.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= cfg.root_vocab_size or freq < cfg.min_freq:
            break
        vocab.append(gram)
    return vocab


def _learn_affixes(
    counts: Counter[str], roots: set[str], cfg: MorphConfig, size: int, *, prefix: bool
) -> list[str]:
    stems: dict[str, set[str]] = {}
    freqs: Counter[str] = Counter()
    for word, freq in counts.items():
        if len(word) < 4:
            continue
        for i in range(1, min(cfg.max_affix_len, len(word) - cfg.min_root_len) + 1):
            affix, stem = (word[:i], word[i:]) if prefix else (word[-i:], word[:-i])
            stems.setdefault(affix, set()).add(stem)
            freqs[affix] += freq
    scores = {}
    for affix, s in stems.items():
        if len(s) >= cfg.min_affix_productivity:
            scores[affix] = len(s) + 2 * len(s & roots) + 0.001 * freqs[affix]
    vocab = [*SPECIALS, "<null>"]
    for affix, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        vocab.append(affix)
    return vocab


class MorphologicalTokenizer:
    """(root, prefix, suffix) tokenizer; ``encode`` returns ``[T, 3]`` rows as lists.

    Ids: every vocabulary starts ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3; the
    affix vocabularies add ``<null>`` 4 (no affix); the root vocabulary has the 14
    punctuation characters at 4..17. ``vocab_size`` is the root vocabulary size.
    """

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS
    null_affix_id = NULL

    def __init__(
        self, roots: list[str], prefixes: list[str], suffixes: list[str], cfg: MorphConfig
    ) -> None:
        self.cfg = cfg
        self.roots, self.prefixes, self.suffixes = roots, prefixes, suffixes
        self._root_id = {w: i for i, w in enumerate(roots)}
        self._prefix_id = {w: i for i, w in enumerate(prefixes)}
        self._suffix_id = {w: i for i, w in enumerate(suffixes)}
        self._cache: dict[str, tuple[int, int, int]] = {}
        digest = hashlib.sha256(
            json.dumps([roots, prefixes, suffixes], ensure_ascii=False).encode()
        ).hexdigest()[:12]
        # The learned vocabularies are part of the name: two tokenizers learned from
        # different corpora must not share token caches.
        self.name = f"morphological-r{len(roots)}-p{len(prefixes)}-s{len(suffixes)}-{digest}"

    @property
    def vocab_size(self) -> int:
        return len(self.roots)

    @property
    def prefix_vocab_size(self) -> int:
        return len(self.prefixes)

    @property
    def suffix_vocab_size(self) -> int:
        return len(self.suffixes)

    @classmethod
    def train(cls, text: str, cfg: MorphConfig | None = None) -> MorphologicalTokenizer:
        """Learn the three vocabularies from ``text``."""
        cfg = cfg or MorphConfig()
        counts = Counter(w for w in split_words(text) if w not in PUNCT)
        roots = _learn_roots(counts, cfg)
        root_set = set(roots)
        prefixes = _learn_affixes(counts, root_set, cfg, cfg.prefix_vocab_size, prefix=True)
        suffixes = _learn_affixes(counts, root_set, cfg, cfg.suffix_vocab_size, prefix=False)
        return cls(roots, prefixes, suffixes, cfg)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Write config and vocabularies to one JSON file."""
        data = {
            "config": dataclasses.asdict(self.cfg),
            "roots": self.roots,
            "prefixes": self.prefixes,
            "suffixes": self.suffixes,
        }
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> MorphologicalTokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg = MorphConfig(**data["config"])
        return cls(data["roots"], data["prefixes"], data["suffixes"], cfg)

    # ------------------------------------------------------------------ parsing

    def _parse_uncached(self, word: str) -> tuple[int, int, int]:
        """Best (root, prefix, suffix) ids of one word by the original's score."""
        if word in self._root_id and len(word) == 1:
            return self._root_id[word], NULL, NULL  # punctuation
        if len(word) < self.cfg.min_root_len:
            return self._root_id.get(word, UNK), NULL, NULL
        best, best_score = (NULL, word, NULL), 0.0
        m = self.cfg.min_root_len
        for p in range(min(self.cfg.max_affix_len, len(word) - m) + 1):
            pid = self._prefix_id.get(word[:p]) if p else NULL
            if pid is None:
                continue
            rest = word[p:]
            for s in range(min(self.cfg.max_affix_len, len(rest) - m) + 1):
                sid = self._suffix_id.get(rest[-s:]) if s else NULL
                if sid is None:
                    continue
                root = rest[: len(rest) - s]
                score = 1000 * (root in self._root_id) + 10 * len(root) - (p + s)
                if score > best_score:
                    best, best_score = (pid, root, sid), score
        pid, root, sid = best
        return self._root_id.get(root, UNK), pid, sid

    def parse(self, word: str) -> tuple[int, int, int]:
        """(root, prefix, suffix) ids of a word, memoised (half the cache is evicted when full)."""
        hit = self._cache.get(word)
        if hit is None:
            if len(self._cache) >= self.cfg.parse_cache_size:
                for key in list(self._cache)[: len(self._cache) // 2]:
                    del self._cache[key]
            hit = self._cache[word] = self._parse_uncached(word)
        return hit

    # ------------------------------------------------------------------ encode / decode

    def _pieces(self, text: str) -> Iterator[tuple[str, int]]:
        """Each word with the UTF-8 length of it plus the whitespace before it."""
        prev = 0
        for m in _TOKEN_RE.finditer(text):
            yield m.group(), len(text[prev : m.end()].encode("utf-8"))
            prev = m.end()

    def encode(self, text: str) -> list[list[int]]:
        """``[T, 3]`` rows (root, prefix, suffix), without BOS/EOS."""
        return [list(self.parse(w)) for w in split_words(text)]

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """ids ``[T, 3]`` int32 and source bytes per token ``[T]`` (they sum to the text's)."""
        pieces = list(self._pieces(text))
        ids = np.array([self.parse(w) for w, _ in pieces], dtype=np.int32).reshape(-1, 3)
        nbytes = np.array([n for _, n in pieces], dtype=np.int32)
        if len(nbytes):  # trailing whitespace belongs to the last token
            nbytes[-1] += len(text.encode("utf-8")) - int(nbytes.sum())
        return ids, nbytes

    def token_text(self, row: Sequence[int]) -> str:
        """Surface form prefix + root + suffix of one ``(root, prefix, suffix)`` row."""
        r, p, s = (int(x) for x in row)
        pre = self.prefixes[p] if p > NULL else ""
        suf = self.suffixes[s] if s > NULL else ""
        return pre + self.roots[r] + suf

    def decode(self, ids: Sequence[Sequence[int]]) -> str:
        """Rebuild text: words joined by spaces, none before closing or after opening marks."""
        out: list[str] = []
        for row in ids:
            if int(row[0]) in (PAD, BOS, EOS):
                continue
            word = self.token_text(row)
            if out and word not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
                out.append(" ")
            out.append(word)
        return "".join(out)
