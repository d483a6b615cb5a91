"""Pipeline: cache keys, packing/padding against numpy, resumable iterators, sharding, eval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpf.config import ConfigError
from qpf.data import (
    ByteTokenizer,
    DataConfig,
    bits_per_byte,
    build_datasets,
    cache_key,
    cached_stream,
    gather,
    load_corpus,
    pack_windows,
    span_windows,
    tokenize_docs,
)
from qpf.data.pipeline import pad_row

T, B = 16, 4


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> str:
    """A small deterministic text file (paragraphs of random words) as a ``text:`` corpus."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "epsilon", "zeta", "éta", "theta", "x", "yo"]
    paras = [" ".join(rng.choice(words, rng.integers(1, 40)).tolist()) for _ in range(120)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return f"text:{path}"


def _cfg(corpus: str, tmp_path, **kw) -> DataConfig:
    base = dict(corpus=corpus, tokenizer="byte", seq_len=T, batch_size=B, cache_dir=str(tmp_path))
    return DataConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("mode", "stride", "'pack', 'pad'"),
        ("tokenizer", "bert", "gpt2"),
        ("corpus", "c4", "text:PATH"),
        ("seq_len", 1, ">= 2"),
        ("batch_size", 0, "> 0"),
        ("eval_fraction", 1.0, "(0, 1)"),
        ("eval_split", "dev", "'validation', 'test'"),
        ("num_workers", -1, ">= 0"),
    ],
)
def test_config_errors_name_field(field, value, allowed):
    with pytest.raises(ConfigError, match=f"DataConfig.{field}") as e:
        DataConfig(**{field: value})
    assert allowed in str(e.value)


# ----------------------------------------------------------------------------- cache


def test_cache_key_changes_with_inputs(text_corpus, tmp_path):
    base = cache_key("tinyshakespeare", "train", "a" * 64, "gpt2")
    assert base == cache_key("tinyshakespeare", "train", "a" * 64, "gpt2")
    assert base != cache_key("tinyshakespeare", "train", "b" * 64, "gpt2")  # text changed
    assert base != cache_key("tinyshakespeare", "train", "a" * 64, "byte")  # tokenizer
    assert base != cache_key("tinystories", "train", "a" * 64, "gpt2")  # corpus
    assert base != cache_key("tinyshakespeare", "eval", "a" * 64, "gpt2")  # split
    # Editing the text of a corpus changes its content hash and so the key.
    c1 = load_corpus(text_corpus, cache_dir=tmp_path)
    path = tmp_path / "edited.txt"
    path.write_text("\n\n".join([*c1.train[:-1], c1.train[-1] + "!", *c1.eval]))
    c2 = load_corpus(f"text:{path}", cache_dir=tmp_path)
    assert c1.sha256("train") != c2.sha256("train")
    assert c1.sha256("eval") == c2.sha256("eval")


def test_cached_stream_round_trip(tmp_path):
    tok = ByteTokenizer()
    docs = ["ab", "", "cdé"]
    stream = cached_stream(docs, tok, tmp_path, "k")
    np.testing.assert_array_equal(stream.tokens, [97, 98, 258, 99, 100, 195, 169, 258])
    np.testing.assert_array_equal(stream.nbytes, [1, 1, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(stream.docs, [[0, 2], [3, 3], [3, 7]])
    again = cached_stream(["something else"], tok, tmp_path, "k")  # same key: from disk
    assert isinstance(again.tokens, np.memmap)
    np.testing.assert_array_equal(again.tokens, stream.tokens)


# ----------------------------------------------------------------------------- windows


def test_pack_matches_numpy_reference():
    rng = np.random.default_rng(1)
    stream = tokenize_docs(
        ["".join(rng.choice(list("abcdé "), 50)) for _ in range(9)], ByteTokenizer()
    )
    starts, lengths = pack_windows(len(stream), T)
    ref = np.asarray(stream.tokens)[: len(stream) // T * T].reshape(-1, T)
    idx = rng.permutation(len(starts))[:5]
    out = gather(stream, starts[idx], lengths[idx], T, pad_row(ByteTokenizer(), False))
    np.testing.assert_array_equal(out["tokens"], ref[idx])
    assert out["mask"].all()
    assert out["tokens"].dtype == np.int32


def test_pad_windows_per_document():
    tok = ByteTokenizer()
    stream = tokenize_docs(["x" * 5, "y", "z" * 20], tok)  # "y" has too few tokens: dropped
    starts, lengths = span_windows(stream.docs, T, T)
    np.testing.assert_array_equal(lengths, [5, 16, 4])
    out = gather(stream, starts, lengths, T, pad_row(tok, False))
    assert out["mask"].sum(1).tolist() == [5, 16, 4]
    assert (out["tokens"][0, :5] == ord("x")).all()
    assert (out["tokens"][0, 5:] == tok.pad_id).all()
    assert (out["tokens"][2, :4] == ord("z")).all()


def _segments_reference(tokens: np.ndarray, mask: np.ndarray, eos: int) -> np.ndarray:
    """A loop: each row starts at 0 and every EOS (after the first token) opens a new id."""
    out = np.zeros(tokens.shape, np.int32)
    for r in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            out[r, t] = out[r, t - 1] + int(bool(mask[r, t]) and tokens[r, t] == eos)
    return out


def test_segment_ids_open_at_eos():
    tok = ByteTokenizer()
    rng = np.random.default_rng(4)
    docs = ["".join(rng.choice(list("abc "), int(n))) for n in rng.integers(1, 12, 11)]
    docs.insert(3, "")  # an empty document has no EOS and opens nothing
    stream = tokenize_docs(docs, tok)
    pad = pad_row(tok, False)
    starts, lengths = pack_windows(len(stream), T)
    out = gather(stream, starts, lengths, T, pad, with_segments=True)
    assert out["segment_ids"].dtype == np.int32
    ref = _segments_reference(out["tokens"], out["mask"], tok.eos_id)
    np.testing.assert_array_equal(out["segment_ids"], ref)
    assert out["segment_ids"].max() >= 2  # some windows hold three documents
    # Short (eval) windows: padded positions repeat the last real id; an all-masked row is 0.
    s, n = np.array([5, 0]), np.array([7, 0])
    short = gather(stream, s, n, T, pad, with_segments=True)
    ref = _segments_reference(short["tokens"], short["mask"], tok.eos_id)
    np.testing.assert_array_equal(short["segment_ids"][:, :7], ref[:, :7])
    assert (short["segment_ids"][0, 7:] == ref[0, 6]).all()
    assert not short["segment_ids"][1].any()
    assert "segment_ids" not in gather(stream, starts, lengths, T, pad)


def test_segment_ids_in_batches(text_corpus, tmp_path):
    plain = build_datasets(_cfg(text_corpus, tmp_path, seed=2))
    seg = build_datasets(_cfg(text_corpus, tmp_path, seed=2, segment_ids=True))
    a, b = next(plain.train), next(seg.train)
    assert set(a) == {"tokens", "mask"}  # off by default: batches exactly as before
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    eos = ByteTokenizer().eos_id
    np.testing.assert_array_equal(
        b["segment_ids"], _segments_reference(b["tokens"], b["mask"], eos)
    )
    ev = next(seg.eval_batches())
    ref = _segments_reference(ev["tokens"], ev["mask"], eos)
    np.testing.assert_array_equal(ev["segment_ids"], ref)
    pad = build_datasets(_cfg(text_corpus, tmp_path, mode="pad", segment_ids=True))
    assert not next(pad.train)["segment_ids"].any()  # pad windows never cross a document
    with pytest.raises(ConfigError, match="segment_ids"):
        DataConfig(segment_ids=1)


def test_eval_windows_cover_each_target_once():
    for n in (2, 15, 16, 17, 31, 100):
        starts, lengths = span_windows(np.array([[0, n]]), T, T - 1)
        targets = np.concatenate([np.arange(s + 1, s + l) for s, l in zip(starts, lengths)])
        np.testing.assert_array_equal(targets, np.arange(1, n))


# ----------------------------------------------------------------------------- Grain


def test_train_batches_and_resume(text_corpus, tmp_path):
    data = build_datasets(_cfg(text_corpus, tmp_path, seed=3))
    it = data.train
    first = [next(it) for _ in range(3)]
    assert first[0]["tokens"].shape == (B, T)
    assert first[0]["tokens"].dtype == np.int32
    assert first[0]["mask"].dtype == np.bool_
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = data.new_train_iterator()
    fresh.set_state(state)
    for a, b in zip(expected, [next(fresh) for _ in range(4)]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # A rebuilt pipeline (from the token cache) restores the same way.
    again = build_datasets(_cfg(text_corpus, tmp_path, seed=3))
    again.train.set_state(state)
    np.testing.assert_array_equal(next(again.train)["tokens"], expected[0]["tokens"])


def test_epochs_reshuffle_and_cover_all_windows(text_corpus, tmp_path):
    data = build_datasets(_cfg(text_corpus, tmp_path, batch_size=2))
    steps, n_windows = data.info.steps_per_epoch, data.info.n_train_windows
    assert steps == n_windows // 2
    epochs = [np.concatenate([next(data.train)["tokens"] for _ in range(steps)]) for _ in range(2)]
    # The same multiset of windows (duplicates are possible in this repetitive text) ...
    rows = [sorted(r.tobytes() for r in e) for e in epochs]
    assert rows[0] == rows[1]
    assert len(rows[0]) == 2 * steps
    assert not np.array_equal(epochs[0], epochs[1])  # ... in a different order
    other = build_datasets(_cfg(text_corpus, tmp_path, batch_size=2, seed=1))
    assert not np.array_equal(next(other.train)["tokens"], epochs[0][:2])


def test_shards_concatenate_to_single_process_batch(text_corpus, tmp_path):
    single = build_datasets(_cfg(text_corpus, tmp_path, seed=5))
    shards = [build_datasets(_cfg(text_corpus, tmp_path, seed=5), p, 2) for p in range(2)]
    for _ in range(3):
        full = next(single.train)
        parts = [next(s.train) for s in shards]
        assert parts[0]["tokens"].shape == (B // 2, T)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    for full, *parts in zip(single.eval_batches(), *(s.eval_batches() for s in shards)):
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    with pytest.raises(ConfigError, match="multiple of process_count = 3"):
        build_datasets(_cfg(text_corpus, tmp_path), 0, 3)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_eval_covers_every_token_once(text_corpus, tmp_path, mode):
    cfg = _cfg(text_corpus, tmp_path, mode=mode)
    data = build_datasets(cfg)
    corpus = load_corpus(text_corpus, cache_dir=tmp_path)
    batches = list(data.eval_batches())
    assert len(batches) == math.ceil(data.info.n_eval_windows / B)
    assert not batches[-1]["mask"][data.info.n_eval_windows % B or B :].any()
    targets, nbytes = [], 0
    for b in batches:
        assert b["target_bytes"][~b["mask"]].sum() == 0
        tm = b["mask"][:, 1:]
        targets.append(b["tokens"][:, 1:][tm])
        nbytes += int(b["target_bytes"][:, 1:].sum())
    targets = np.concatenate(targets)
    tok = ByteTokenizer()
    if mode == "pack":  # the whole stream (docs + EOS), minus its first token
        stream = np.concatenate([[*tok.encode(d), tok.eos_id] for d in corpus.eval])
        np.testing.assert_array_equal(targets, stream[1:])
    else:  # each document, minus its first token
        stream = np.concatenate([tok.encode(d)[1:] for d in corpus.eval])
        np.testing.assert_array_equal(targets, stream)
    # Bytes of exactly the targets: all eval text except the first byte of each span.
    n_spans = 1 if mode == "pack" else len(corpus.eval)
    total = sum(len(d.encode()) for d in corpus.eval)
    assert nbytes == data.info.val_bytes == total - n_spans
    again = list(data.eval_batches())  # a fresh pass gives the same batches
    assert len(again) == len(batches)
    for a, b in zip(again, batches):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_gpt2_tinyshakespeare(data_dir, tmp_path):
    data = build_datasets(
        DataConfig(
            corpus="tinyshakespeare",
            seq_len=32,
            batch_size=2,
            data_dir=str(data_dir),
            cache_dir=str(tmp_path),
        )
    )
    assert data.info.vocab_size == 50257
    assert data.info.n_train_tokens > 250_000
    batch = next(data.train)
    assert batch["tokens"].shape == (2, 32)
    assert batch["tokens"].max() < 50257
    first = next(iter(data.eval_batches()))
    assert first["target_bytes"].shape == (2, 32)
    row = first["tokens"][0]
    text = data.tokenizer.decode(row[row != data.tokenizer.eos_id])  # EOS stands for 0 bytes
    assert sum(first["target_bytes"][0]) == len(text.encode())
    # Token bytes are exact for GPT-2: targets' bytes + the first token's = the eval text.
    corpus = load_corpus("tinyshakespeare", data_dir=data_dir, cache_dir=tmp_path)
    first_tok = data.tokenizer.encode(corpus.eval[0])[0]
    first_len = len(data.tokenizer.decode([first_tok]).encode())
    assert data.info.val_bytes == sum(len(d.encode()) for d in corpus.eval) - first_len


def test_morphological_pipeline(text_corpus, tmp_path):
    cfg = _cfg(
        text_corpus,
        tmp_path,
        tokenizer="morphological",
        tokenizer_options=(("root_vocab_size", 64), ("prefix_vocab_size", 8)),
        batch_size=2,
    )
    data = build_datasets(cfg)
    batch = next(data.train)
    assert batch["tokens"].shape == (2, T, 3)
    assert data.tokenizer.name.startswith("morphological-r")
    last = list(data.eval_batches())[-1]
    pad = last["tokens"][~last["mask"]]
    assert (pad == [0, 4, 4]).all()
    # The learned tokenizer is cached and reused.
    assert build_datasets(cfg).tokenizer.name == data.tokenizer.name


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 100, 50) == pytest.approx(2.0)
    assert bits_per_byte(0.0, 0) == 0.0
