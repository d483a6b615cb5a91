"""Windows over token streams, and the Grain input pipeline built on them.

A *window* is ``(start, length)`` into a ``TokenStream``; a batch gathers windows into
``tokens [B, T]`` (``[B, T, 3]`` morphological) and ``mask [B, T]`` (True on real tokens).
Inside a window the model predicts token t+1 from tokens <= t, so the loss uses
``mask[:, 1:]`` on the targets ``tokens[:, 1:]``.

* ``pack`` (default): documents, each followed by EOS, form one stream cut into
  non-overlapping windows of ``seq_len`` tokens; the tail shorter than a window is dropped.
* ``pad`` (the original's ``V4Dataset``): each document separately, cut into windows of
  ``seq_len`` with the last one right-padded (``pad_id``, mask False). Documents of fewer than
  two tokens are dropped; unlike the original, tails are padded rather than dropped.

Evaluation windows advance by ``seq_len - 1`` so that the first token of each window is the
last of the previous one: every token of the validation stream except the very first (per
document in ``pad`` mode) is a predicted target exactly once.

Document boundaries (``DataConfig.segment_ids``): batches also carry ``segment_ids`` int32
[B, T], 0 at each window's first token and +1 at every document start inside the window.
The EOS separator *opens* the next segment (it plays the next document's BOS), so the
model reads a document from its EOS with no state from the previous one, while the EOS
target itself is still predicted from the document it ends. ``pad`` windows never cross a
document, so their ids are all 0. Models reset recurrences, memories and attention where
the id changes (see README, "Document boundaries").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from qpf.config import ConfigError
from qpf.data.cache import TokenStream, cache_key, cached_stream
from qpf.data.corpora import CORPUS_NAMES, Corpus, cache_dir_from, load_corpus
from qpf.data.tokenizers import TOKENIZER_NAMES, Tokenizer, get_tokenizer

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- config


def _check(cond: bool, cfg: Any, field: str, allowed: str) -> None:
    if not cond:
        value = getattr(cfg, field)
        raise ConfigError(f"{type(cfg).__name__}.{field} = {value!r} is invalid: allowed {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it. Invalid values raise ``ConfigError``.

    eval_fraction: held-out tail for corpora without a validation file.
    eval_split: "validation" or "test" (test: wikitext2 only).
    tokenizer_options: (name, value) pairs of ``MorphConfig`` for the morphological tokenizer.
    segment_ids: batches carry ``segment_ids`` int32 [B, T] (document index inside each
      window, the EOS separator opening the next document) so models reset at document
      starts; off keeps the batches (and every model output) exactly as before.
    read_threads/prefetch: Grain ``ReadOptions`` (threads and buffer per process).
    num_workers: Grain worker processes (0 = in-process).
    """

    corpus: str = "tinyshakespeare"
    tokenizer: str = "gpt2"
    seq_len: int = 256
    batch_size: int = 8
    mode: str = "pack"
    seed: int = 0
    eval_fraction: float = 0.1
    eval_split: str = "validation"
    data_dir: str | None = None
    cache_dir: str | None = None
    read_threads: int = 0
    prefetch: int = 2
    num_workers: int = 0
    tokenizer_options: tuple[tuple[str, Any], ...] = ()
    segment_ids: bool = False

    def __post_init__(self) -> None:
        names = ", ".join((*CORPUS_NAMES, "text:PATH"))
        _check(
            self.corpus in CORPUS_NAMES or str(self.corpus).startswith("text:"),
            self,
            "corpus",
            f"one of {names}",
        )
        _check(self.tokenizer in TOKENIZER_NAMES, self, "tokenizer", f"one of {TOKENIZER_NAMES}")
        _check(_is_int(self.seq_len) and self.seq_len >= 2, self, "seq_len", "an int >= 2")
        _check(_is_int(self.batch_size) and self.batch_size > 0, self, "batch_size", "an int > 0")
        _check(self.mode in ("pack", "pad"), self, "mode", "one of 'pack', 'pad'")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**32, self, "seed", "an int in [0, 2**32)")
        _check(
            isinstance(self.eval_fraction, int | float) and 0.0 < self.eval_fraction < 1.0,
            self,
            "eval_fraction",
            "a float in (0, 1)",
        )
        _check(
            self.eval_split in ("validation", "test"),
            self,
            "eval_split",
            "one of 'validation', 'test'",
        )
        for f in ("read_threads", "prefetch", "num_workers"):
            _check(_is_int(getattr(self, f)) and getattr(self, f) >= 0, self, f, "an int >= 0")
        _check(isinstance(self.segment_ids, bool), self, "segment_ids", "a bool")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """Sizes of what was built. ``val_bytes``: UTF-8 bytes of all eval targets (for bpb)."""

    corpus: str
    tokenizer: str
    vocab_size: int
    eval_source: str
    n_train_tokens: int
    n_val_tokens: int
    n_train_windows: int
    n_eval_windows: int
    steps_per_epoch: int
    val_bytes: int


# ----------------------------------------------------------------------------- windows


def pack_windows(n_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping full windows over a stream: (starts [W], lengths [W])."""
    n = n_tokens // seq_len
    return np.arange(n, dtype=np.int64) * seq_len, np.full(n, seq_len, np.int64)


def span_windows(
    spans: np.ndarray, seq_len: int, stride: int, min_len: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of at most ``seq_len`` every ``stride`` tokens inside each (start, end) span.

    A window is emitted while it has at least ``min_len`` tokens left; the last may be short
    (it is padded when gathered).
    """
    starts, lengths = [], []
    for a, b in np.asarray(spans, dtype=np.int64).reshape(-1, 2):
        if b - a < min_len:
            continue
        s = np.arange(a, b - min_len + 1, stride, dtype=np.int64)
        if stride < seq_len:  # overlapping: stop once a window reaches the end
            s = s[: int(np.searchsorted(s + seq_len, b, side="left")) + 1]
        starts.append(s)
        lengths.append(np.minimum(seq_len, b - s))
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(lengths)


def pad_row(tok: Tokenizer, morph: bool) -> np.ndarray:
    """The id (or (root, prefix, suffix) row) written at padded positions."""
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if morph:
        return np.array([pad, tok.null_affix_id, tok.null_affix_id], np.int32)
    return np.array(pad, np.int32)


def segment_ids(stream: TokenStream, idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Document index of stream positions ``idx`` [B, T], relative to each row's first.

    A document's EOS (at its ``docs`` end; empty documents have none) belongs to the next
    document: the id at stream position i counts the EOS tokens at positions <= i. Masked
    (padded) positions repeat the row's last real id. Returns int32 [B, T].
    """
    docs = np.asarray(stream.docs, np.int64).reshape(-1, 2)
    eos = docs[docs[:, 1] > docs[:, 0], 1]  # sorted: documents are laid out in order
    seg = np.searchsorted(eos, np.asarray(idx, np.int64), side="right")
    seg = np.maximum.accumulate(np.where(mask, seg, 0), axis=1)  # pads: the last real id
    return (seg - seg[:, :1]).astype(np.int32)


def gather(
    stream: TokenStream,
    starts: np.ndarray,
    lengths: np.ndarray,
    seq_len: int,
    pad: np.ndarray,
    with_bytes: bool = False,
    with_segments: bool = False,
) -> Batch:
    """Windows -> ``tokens`` int32 [B, T(, 3)], ``mask`` bool [B, T] (+ ``target_bytes``,
    + ``segment_ids`` int32 [B, T] with ``with_segments``: see ``segment_ids``)."""
    offs = np.arange(seq_len, dtype=np.int64)
    mask = offs[None, :] < np.asarray(lengths)[:, None]
    idx = np.where(mask, np.asarray(starts)[:, None] + offs[None, :], 0)
    tokens = np.asarray(stream.tokens[idx.ravel()], np.int32).reshape(*idx.shape, -1)
    tokens = np.where(mask[..., None], tokens, pad.reshape(1, 1, -1))
    if stream.tokens.ndim == 1:
        tokens = tokens[..., 0]
    out = {"tokens": tokens.astype(np.int32), "mask": mask}
    if with_bytes:
        nb = np.asarray(stream.nbytes[idx.ravel()], np.int32).reshape(idx.shape)
        out["target_bytes"] = np.where(mask, nb, 0).astype(np.int32)
    if with_segments:
        out["segment_ids"] = segment_ids(stream, idx, mask)
    return out


def target_bytes_total(stream: TokenStream, starts: np.ndarray, lengths: np.ndarray) -> int:
    """Bytes of every window's targets (positions 1..length-1), via a prefix sum."""
    csum = np.concatenate([[0], np.cumsum(np.asarray(stream.nbytes, np.int64))])
    starts, lengths = np.asarray(starts), np.asarray(lengths)
    return int((csum[starts + lengths] - csum[starts + 1]).sum()) if len(starts) else 0


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """bpb = (sum of CE nats over predicted targets / ln 2) / UTF-8 bytes of those targets."""
    return float(total_nats) / math.log(2) / max(int(total_bytes), 1)


# ----------------------------------------------------------------------------- datasets


def _shard(batch: Batch, process_index: int, per_process: int) -> Batch:
    lo = process_index * per_process
    return {k: v[lo : lo + per_process] for k, v in batch.items()}


def _train_batch(
    idx: np.ndarray,
    *,
    stream: TokenStream,
    starts: np.ndarray,
    lengths: np.ndarray,
    seq_len: int,
    pad: np.ndarray,
    process_index: int,
    per_process: int,
    with_segments: bool = False,
) -> Batch:
    """Global batch of window indices -> this process's slice of the gathered batch."""
    mine = np.asarray(idx)[process_index * per_process : (process_index + 1) * per_process]
    return gather(stream, starts[mine], lengths[mine], seq_len, pad, with_segments=with_segments)


@dataclasses.dataclass
class Datasets:
    """What ``build_datasets`` returns.

    train: an endless Grain ``DatasetIterator`` of batches (reshuffled every epoch) with
      ``get_state()``/``set_state()``; per-process batch is ``batch_size // process_count``.
    tokenizer, info: the tokenizer used and the sizes (``DataInfo``).
    """

    train: grain.DatasetIterator
    tokenizer: Tokenizer
    info: DataInfo
    train_dataset: grain.IterDataset
    _eval: TokenStream
    _eval_windows: tuple[np.ndarray, np.ndarray]
    _seq_len: int
    _batch_size: int
    _pad: np.ndarray
    _process_index: int
    _per_process: int
    _segment_ids: bool = False

    def eval_batches(self) -> Iterator[Batch]:
        """The whole eval split once, in order: ``tokens``, ``mask``, ``target_bytes`` [B, T].

        The last global batch is filled with all-False rows. ``target_bytes`` is the UTF-8
        length of each token (0 where masked); sum ``target_bytes[:, 1:]`` for the bytes of
        the predicted targets (over all processes it totals ``info.val_bytes``).
        With ``DataConfig.segment_ids`` the batches also carry ``segment_ids`` [B, T].
        """
        starts, lengths = self._eval_windows
        b = self._batch_size
        for lo in range(0, len(starts), b):
            s, n = starts[lo : lo + b], lengths[lo : lo + b]
            fill = b - len(s)  # zero-length windows are fully masked rows
            s = np.concatenate([s, np.zeros(fill, np.int64)])
            n = np.concatenate([n, np.zeros(fill, np.int64)])
            batch = gather(
                self._eval,
                s,
                n,
                self._seq_len,
                self._pad,
                with_bytes=True,
                with_segments=self._segment_ids,
            )
            yield _shard(batch, self._process_index, self._per_process)

    def new_train_iterator(self) -> grain.DatasetIterator:
        """A fresh train iterator from the first batch (``train`` is one already made)."""
        return iter(self.train_dataset)


def _morph_tokenizer(cfg: DataConfig, corpus: Corpus) -> Tokenizer:
    """Learn (or load the cached) morphological tokenizer from the train split."""
    from qpf.data.morphological import MorphConfig, MorphologicalTokenizer

    mcfg = MorphConfig(**dict(cfg.tokenizer_options))
    key = cache_key(corpus.name, "train", corpus.sha256("train"), repr(mcfg))
    path = cache_dir_from(cfg.cache_dir) / "tokenizers" / f"morphological-{key}.json"
    if path.is_file():
        return MorphologicalTokenizer.load(path)
    tok = MorphologicalTokenizer.train("\n\n".join(corpus.train), mcfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def make_tokenizer(cfg: DataConfig, corpus: Corpus) -> Tokenizer:
    if cfg.tokenizer == "morphological":
        return _morph_tokenizer(cfg, corpus)
    data_dir = cfg.data_dir or os.environ.get("QPF_DATA_DIR")
    return get_tokenizer(cfg.tokenizer, data_dir=data_dir, **dict(cfg.tokenizer_options))


def streams(cfg: DataConfig, corpus: Corpus, tok: Tokenizer) -> tuple[TokenStream, TokenStream]:
    """(train, eval) token streams, through the on-disk cache."""
    cache = cache_dir_from(cfg.cache_dir)
    out = []
    for split, docs in (("train", corpus.train), (f"eval:{corpus.eval_source}", corpus.eval)):
        key = cache_key(corpus.name, split, corpus.sha256(split.split(":")[0]), tok.name)
        out.append(cached_stream(docs, tok, Path(cache), key))
    return out[0], out[1]


def _check_processes(cfg: DataConfig, process_index: int, process_count: int) -> int:
    """Rows of each global batch that this process feeds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ConfigError(
            f"DataConfig.batch_size = {cfg.batch_size} is invalid: allowed a multiple of "
            f"process_count = {process_count}"
        )
    return cfg.batch_size // process_count


def make_windows(
    cfg: DataConfig, train: TokenStream, evals: TokenStream
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train windows, eval windows) of ``cfg.mode``; each is (starts [W], lengths [W])."""
    T = cfg.seq_len
    if cfg.mode == "pack":
        return pack_windows(len(train), T), span_windows(np.array([[0, len(evals)]]), T, T - 1)
    return span_windows(train.docs, T, T), span_windows(evals.docs, T, T - 1)


def check_windows(
    cfg: DataConfig, corpus: str, train: TokenStream, evals: TokenStream, n_train: int, n_eval: int
) -> None:
    """A corpus too small for one batch (or one eval window) says what would fit."""
    if n_train // cfg.batch_size == 0:
        n = len(train)
        fits = []
        if n // cfg.batch_size >= 2:
            fits.append(f"--seq-len {n // cfg.batch_size} (at --batch-size {cfg.batch_size})")
        if n // cfg.seq_len >= 1:
            fits.append(f"--batch-size {n // cfg.seq_len} (at --seq-len {cfg.seq_len})")
        fit = " or ".join(fits) if fits else "a larger corpus"
        raise ConfigError(
            f"corpus {corpus} is too small for one batch: its train split has {n:,} tokens "
            f"({n_train} window(s) of --seq-len {cfg.seq_len}, {cfg.mode} mode), and one batch "
            f"needs --batch-size {cfg.batch_size} windows. What fits: {fit}"
            + (
                "; --set data.mode=pad pads short documents instead of packing them"
                if cfg.mode == "pack"
                else ""
            )
        )
    if n_eval == 0:
        raise ConfigError(
            f"corpus {corpus}: its evaluation split has {len(evals):,} tokens, too few for "
            "one evaluation window (2 tokens per document at least); use a larger corpus or "
            "--set data.eval_fraction=0.2 to hold out more"
        )


def _train_dataset(
    cfg: DataConfig,
    train: TokenStream,
    windows: tuple[np.ndarray, np.ndarray],
    pad: np.ndarray,
    process_index: int,
    per_process: int,
) -> grain.IterDataset:
    starts, lengths = windows
    fn = functools.partial(
        _train_batch,
        stream=train,
        starts=starts,
        lengths=lengths,
        seq_len=cfg.seq_len,
        pad=pad,
        process_index=process_index,
        per_process=per_process,
        with_segments=cfg.segment_ids,
    )
    # Shuffle window indices, batch them (drop remainder: every step is full), repeat with a
    # per-epoch reseeded shuffle; gathering happens last, on this process's slice only.
    ds = (
        grain.MapDataset.range(len(starts))
        .shuffle(seed=cfg.seed)
        .batch(cfg.batch_size, drop_remainder=True)
        .repeat(None)
        .map(fn)
    )
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it_ds


def build_datasets(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> Datasets:
    """Load, tokenize (cached), window and batch a corpus for training and evaluation.

    Each of ``process_count`` processes gets rows ``[p*b, (p+1)*b)`` of every global batch,
    with ``b = batch_size // process_count``, so the processes' batches concatenated in
    process order equal the single-process batch.
    """
    per_process = _check_processes(cfg, process_index, process_count)
    corpus = load_corpus(cfg.corpus, cfg.data_dir, cfg.cache_dir, cfg.eval_fraction, cfg.eval_split)
    tok = make_tokenizer(cfg, corpus)
    train, evals = streams(cfg, corpus, tok)
    pad = pad_row(tok, train.tokens.ndim == 2)
    (starts, lengths), eval_w = make_windows(cfg, train, evals)
    check_windows(cfg, corpus.name, train, evals, len(starts), len(eval_w[0]))
    it_ds = _train_dataset(cfg, train, (starts, lengths), pad, process_index, per_process)
    info = DataInfo(
        corpus=corpus.name,
        tokenizer=tok.name,
        vocab_size=tok.vocab_size,
        eval_source=corpus.eval_source,
        n_train_tokens=len(train),
        n_val_tokens=len(evals),
        n_train_windows=len(starts),
        n_eval_windows=len(eval_w[0]),
        steps_per_epoch=len(starts) // cfg.batch_size,
        val_bytes=target_bytes_total(evals, *eval_w),
    )
    return Datasets(
        train=iter(it_ds),
        tokenizer=tok,
        info=info,
        train_dataset=it_ds,
        _eval=evals,
        _eval_windows=eval_w,
        _seq_len=cfg.seq_len,
        _batch_size=cfg.batch_size,
        _pad=pad,
        _process_index=process_index,
        _per_process=per_process,
        _segment_ids=cfg.segment_ids,
    )
