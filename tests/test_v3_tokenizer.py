"""The faithful v3 tokenizer: 0 merges, spaces dropped, the spec's verified example."""

from __future__ import annotations

from qpf.data.tokenizers import ByteTokenizer
from qpf.data.v3_tokenizer import SPECIALS, V3CharTokenizer, count_pairs

TEXTS = ["The brain-inspired model is amazing.", "Models learn 42 things, Quickly"]


def test_training_finds_no_merges_and_yields_characters():
    tok = V3CharTokenizer.train(TEXTS)
    assert tok.merges == []
    assert count_pairs(["<bos>brain<eos>"]) == {}
    chars = sorted({c for t in TEXTS for c in t if not c.isspace()})
    assert tok.vocab == [*SPECIALS, *chars]


def test_spec_example_drops_spaces_and_unknowns():
    tok = V3CharTokenizer.train(TEXTS)
    ids = tok.encode("The brain-inspired model is amazing!")
    assert tok.decode(ids) == "Thebrain-inspiredmodelisamazing<unk>"
    assert tok.decode(tok.encode("bin Quick 42s")) == "bin Quick 42 s"
    ids, nbytes = tok.encode_with_bytes("ab  c")
    assert list(nbytes) == [1, 1, 3]
    assert len(ids) == 3


def test_bytes_are_the_lossless_default():
    tok = ByteTokenizer()
    text = "The brain-inspired model is amazing! é€"
    assert tok.decode(tok.encode(text)) == text
