"""Tokenizers: GPT-2 ids against known values, exact byte round trips, morphological learning."""

from __future__ import annotations

import numpy as np
import pytest

from qpf.data import ByteTokenizer, MorphConfig, MorphologicalTokenizer, get_tokenizer
from qpf.data.morphological import NULL, UNK


@pytest.fixture(scope="module")
def gpt2(data_dir):
    return get_tokenizer("gpt2", data_dir=data_dir)


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("hello world") == [31373, 995]
    # Special-token text is encoded as ordinary characters, never as id 50256.
    assert 50256 not in gpt2.encode("a <|endoftext|> b")
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_round_trip_and_bytes(gpt2):
    text = "Ünïcödé — 日本語 text, with emoji 🙂 and\nnewlines.\n"
    ids, nbytes = gpt2.encode_with_bytes(text)
    assert gpt2.decode(ids) == text
    # Per-token byte lengths add up to the text's UTF-8 length (for bits-per-byte).
    assert int(nbytes.sum()) == len(text.encode("utf-8"))
    assert gpt2.token_bytes(np.array([50256]))[0] == 0


def test_byte_round_trip_random_and_invalid():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tok.decode_bytes(tok.encode_bytes(data)) == data
    invalid = b"\xff\xfe abc \xc3\x28 \xe2\x82"
    assert tok.decode_bytes(tok.encode_bytes(invalid)) == invalid
    assert tok.decode(tok.encode_bytes(invalid)) == invalid.decode("utf-8", errors="replace")
    # Specials are dropped on decode; text round-trips.
    assert tok.decode([257, *tok.encode("héllo"), 258, 256]) == "héllo"
    ids, nbytes = tok.encode_with_bytes("héllo")
    assert ids.tolist() == list("héllo".encode())
    assert nbytes.sum() == 6


def test_get_tokenizer_unknown_name():
    with pytest.raises(ValueError, match="gpt2, byte, morphological"):
        get_tokenizer("wordpiece")


# ----------------------------------------------------------------------------- morphological

STEMS = ["walk", "talk", "jump", "play", "paint", "cook"]


def _morph_corpus() -> str:
    # Stems are frequent (whole-word roots); inflected forms appear once each, so they can
    # only be parsed as stem + suffix.
    frequent = " ".join(STEMS * 10)
    rare = " ".join(f"{s}ing {s}ed {s}s" for s in STEMS[:5])
    return f"{frequent}. {rare}, (the) the the the the the!"


@pytest.fixture(scope="module")
def morph() -> MorphologicalTokenizer:
    cfg = MorphConfig(root_vocab_size=200, prefix_vocab_size=32, suffix_vocab_size=32)
    return MorphologicalTokenizer.train(_morph_corpus(), cfg)


def test_morph_vocab_layout(morph):
    assert morph.roots[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert morph.roots[4:18] == list(".,!?:;'\"()[]{}")
    assert morph.prefixes[NULL] == "<null>"
    assert morph.suffixes[NULL] == "<null>"
    assert all(s in morph.roots for s in STEMS)
    assert "ing" in morph.suffixes
    assert "ed" in morph.suffixes


def test_morph_parse_and_decode(morph):
    # A word in the root vocab stays whole; an unseen inflection splits into stem + suffix.
    assert morph.parse("walk") == (morph.roots.index("walk"), NULL, NULL)
    assert morph.parse("cooking") == (
        morph.roots.index("cook"),
        NULL,
        morph.suffixes.index("ing"),
    )
    text = "the cook was cooking, (walked) and talks!"
    ids = morph.encode(text)
    assert np.asarray(ids).shape == (11, 3)
    decoded = morph.decode(ids)
    # "was" and "and" are unknown roots (lossy, as in the original); the rest is rebuilt.
    assert decoded == "the cook <unk> cooking, (walked) <unk> talks!"
    assert morph.parse("xy") == (UNK, NULL, NULL)


def test_morph_bytes_cover_text(morph):
    text = "  the cook,\n walked  "
    ids, nbytes = morph.encode_with_bytes(text)
    assert ids.shape == (4, 3)
    assert ids.dtype == np.int32
    assert int(nbytes.sum()) == len(text.encode("utf-8"))


def test_morph_save_load_round_trip(morph, tmp_path):
    path = tmp_path / "morph.json"
    morph.save(path)
    loaded = get_tokenizer("morphological", path=path)
    assert loaded.name == morph.name
    assert (loaded.roots, loaded.prefixes, loaded.suffixes) == (
        morph.roots,
        morph.prefixes,
        morph.suffixes,
    )
    text = "paint painting paints jumped"
    assert loaded.encode(text) == morph.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


def test_morph_name_depends_on_corpus():
    cfg = MorphConfig(root_vocab_size=100, prefix_vocab_size=16, suffix_vocab_size=16)
    a = MorphologicalTokenizer.train(_morph_corpus(), cfg)
    b = MorphologicalTokenizer.train(_morph_corpus() + " cook" * 50 + " bake" * 9, cfg)
    assert a.name != b.name
    assert a.name == MorphologicalTokenizer.train(_morph_corpus(), cfg).name
