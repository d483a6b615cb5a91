"""Corpora: local resolution, deterministic splits, offline errors that name the file."""

from __future__ import annotations

import pytest

from qpf.data import MissingDataError, load_corpus, pydoc_documents, tail_split
from qpf.data.corpora import split_paragraphs


def test_tinyshakespeare_tail_split(data_dir, tmp_path):
    c = load_corpus("tinyshakespeare", data_dir=data_dir, cache_dir=tmp_path)
    docs = split_paragraphs((data_dir / "tinyshakespeare" / "input.txt").read_text())
    assert c.train + c.eval == docs  # nothing dropped, order kept, no overlap
    assert c.train[0].startswith("First Citizen:")
    assert c.eval[-1].endswith("Whiles thou art waking.")
    frac = sum(map(len, c.eval)) / sum(map(len, docs))
    assert 0.09 < frac < 0.11
    again = load_corpus("tinyshakespeare", data_dir=data_dir, cache_dir=tmp_path)
    assert again.sha256("eval") == c.sha256("eval") != c.sha256("train")


def test_wikitext2_valtrain(data_dir, tmp_path):
    c = load_corpus("wikitext2-valtrain", data_dir=data_dir, cache_dir=tmp_path)
    assert c.train[0].startswith(" = Homarus gammarus = ")
    assert c.eval[0].startswith(" = Robert <unk> = ")
    assert c.eval_source == "wikitext-2/test.txt"
    assert all(d.startswith(" = ") for d in c.train + c.eval)


def test_tinystories_slice_holds_out_tail(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QPF_OFFLINE", "1")
    c = load_corpus("tinystories", data_dir=data_dir, cache_dir=tmp_path)
    assert len(c.train) + len(c.eval) == 2316
    assert c.train[0].startswith("One day, a little girl named Lily found a needle")
    assert "tail" in c.eval_source


def test_offline_missing_file_names_it(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QPF_OFFLINE", "1")
    with pytest.raises(MissingDataError, match=r"wikitext-2/train\.txt.*--data-dir"):
        load_corpus("wikitext2", data_dir=data_dir, cache_dir=tmp_path)
    with pytest.raises(MissingDataError, match=str(tmp_path / "tinyshakespeare" / "input.txt")):
        load_corpus("tinyshakespeare", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_data_dir_from_env(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QPF_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QPF_OFFLINE", "1")
    assert load_corpus("tinyshakespeare", cache_dir=tmp_path).train


def test_text_file_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("third para\n\nfourth para\n")
    (tmp_path / "d" / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    c = load_corpus(f"text:{tmp_path / 'd'}", cache_dir=tmp_path / "c", eval_fraction=0.3)
    assert c.train + c.eval == [
        "first para\nline two",
        "second para",
        "third para",
        "fourth para",
    ]
    assert c.eval == ["fourth para"]
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(100)))
    c = load_corpus(f"text:{single}", cache_dir=tmp_path / "c")
    assert c.train[0] + c.eval[0] == single.read_text().strip("\n")  # cut at a newline
    assert c.eval[0].startswith("line 90\n")
    with pytest.raises(MissingDataError):
        load_corpus(f"text:{tmp_path / 'nope.txt'}", cache_dir=tmp_path / "c")


def test_tail_split_never_empty():
    train, evals = tail_split(["a" * 100, "b"], 0.1)
    assert (train, evals) == (["a" * 100], ["b"])
    train, evals = tail_split(["a", "b" * 100], 0.5)
    assert (train, evals) == (["a"], ["b" * 100])


def test_pydoc_is_deterministic(tmp_path):
    docs = pydoc_documents()
    assert docs == pydoc_documents()
    assert sum(map(len, docs)) > 200_000
    assert len(docs) == len(set(docs))
    c = load_corpus("pydoc", cache_dir=tmp_path)
    assert c.train + c.eval == docs


def test_unknown_corpus_and_split(data_dir):
    with pytest.raises(ValueError, match="tinyshakespeare, tinystories"):
        load_corpus("imagenet")
    with pytest.raises(ValueError, match="no test split"):
        load_corpus("tinyshakespeare", data_dir=data_dir, eval_split="test")
