"""Named text corpora, resolved from a local data folder or downloaded into a cache.

A corpus name gives a train and an evaluation list of documents (strings):

=====================  ============================================================  =========
name                   train / evaluation                                            download
=====================  ============================================================  =========
tinyshakespeare        ``tinyshakespeare/input.txt``; last 10% held out              char-rnn
tinystories            ``tinystories/TinyStories-train*.txt``; ``-valid.txt`` if     HF
                       present, else the last 10% of the stories held out
wikitext2              ``wikitext-2/train.txt``; ``valid.txt`` (or ``test.txt``)     pytorch/
                                                                                     examples
wikitext2-valtrain     ``wikitext-2/valid.txt``; ``test.txt`` (offline stand-in:     -
                       only valid/test ship in the shared folder)
pydoc                  docstrings of a fixed list of stdlib modules; last 10% held   none
                       out (needs no files at all; the offline fallback)
text:PATH              a file, or a folder of ``*.txt`` files (sorted); last 10%     -
=====================  ============================================================  =========

Files are looked up in the data folder (``data_dir`` or ``$QPF_DATA_DIR``, laid out like
``shared/data``), then in the cache folder (``cache_dir``, ``$QPF_CACHE_DIR`` or
``~/.cache/qpf``). A missing file is downloaded into the cache from its canonical source
unless ``$QPF_OFFLINE=1``; when that is not possible ``MissingDataError`` says which file to
put where. The WikiText-2 files are the *tokenized* ``wiki.*.tokens`` variant used by
pytorch/examples (same as ``shared/data``), downloaded from that repository.

Documents: TinyStories stories (split at ``<|endoftext|>``), WikiText articles (split at
top-level `` = Title = `` headings), Shakespeare speeches and plain text paragraphs (split at
blank lines), one per docstring for pydoc. The held-out tail is the documents that start in
the last ``eval_fraction`` of the characters, so a split never cuts a document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import urllib.request
import warnings
from pathlib import Path

DEFAULT_EVAL_FRACTION = 0.1
CORPUS_NAMES = ("tinyshakespeare", "tinystories", "wikitext2", "wikitext2-valtrain", "pydoc")

URLS = {
    "tinyshakespeare/input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    ),
    "tinystories/TinyStories-train.txt": (
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt"
    ),
    "tinystories/TinyStories-valid.txt": (
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"
    ),
    **{
        f"wikitext-2/{s}.txt": (
            "https://raw.githubusercontent.com/pytorch/examples/main/"
            f"word_language_model/data/wikitext-2/{s}.txt"
        )
        for s in ("train", "valid", "test")
    },
}


class MissingDataError(FileNotFoundError):
    """A corpus file is absent and could not be downloaded."""


class CorpusError(ValueError):
    """A corpus file exists but cannot be used (not UTF-8, no text); names the file."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus split into documents: ``train`` and ``eval`` lists of strings."""

    name: str
    train: list[str]
    eval: list[str]
    eval_source: str  # how the eval split was made, for logs: a file name or "tail 10%"

    def sha256(self, split: str) -> str:
        """Content hash of one split (documents joined by NUL), for cache keys."""
        docs = self.train if split == "train" else self.eval
        h = hashlib.sha256()
        for d in docs:
            h.update(d.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


# ----------------------------------------------------------------------------- files


def data_dir_from(data_dir: str | os.PathLike | None) -> Path | None:
    value = data_dir or os.environ.get("QPF_DATA_DIR")
    return Path(value).expanduser() if value else None


def cache_dir_from(cache_dir: str | os.PathLike | None) -> Path:
    value = cache_dir or os.environ.get("QPF_CACHE_DIR") or "~/.cache/qpf"
    return Path(value).expanduser()


def _local(rel: str, data_dir: Path | None, cache_dir: Path) -> Path | None:
    for root in (data_dir, cache_dir):
        if root is not None and (root / rel).is_file():
            return root / rel
    return None


def _download(rel: str, cache_dir: Path, data_dir: Path | None) -> Path:
    """Download ``rel`` into the cache (atomically), or raise ``MissingDataError``."""
    where = f"{data_dir / rel}" if data_dir else f"<data-dir>/{rel}"
    hint = f"put the file at {where} (pass --data-dir / data_dir or set QPF_DATA_DIR)"
    if os.environ.get("QPF_OFFLINE") == "1":
        raise MissingDataError(f"{rel} not found and QPF_OFFLINE=1: {hint}")
    url = URLS[rel]
    dest = cache_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        msg = f"{rel} not found and download from {url} failed ({e}): {hint}"
        raise MissingDataError(msg) from e
    os.replace(tmp, dest)
    return dest


def fetch(rel: str, data_dir: Path | None, cache_dir: Path) -> Path:
    """Path of a corpus file: local copy, else downloaded into the cache."""
    return _local(rel, data_dir, cache_dir) or _download(rel, cache_dir, data_dir)


def _read(path: Path) -> str:
    """A corpus file's text; invalid UTF-8 is a ``CorpusError`` naming the file and offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise CorpusError(
            f"corpus file {path} is not valid UTF-8 (byte {err.start}, line {line}: "
            f"{err.reason}): convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8"
        ) from None


# ----------------------------------------------------------------------------- documents


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs (surrounding newlines stripped, empties dropped)."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_stories(text: str) -> list[str]:
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


_WIKI_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def split_articles(text: str) -> list[str]:
    """WikiText articles: each starts at a top-level `` = Title = `` line."""
    starts = [m.start() for m in _WIKI_TITLE.finditer(text)]
    bounds = [0, *[s for s in starts if s > 0], len(text)]
    # Trailing blank lines go; the leading space of " = Title = " stays.
    docs = [text[a:b].rstrip() for a, b in itertools.pairwise(bounds)]
    return [d for d in docs if d]


def tail_split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval): eval is the documents that start in the last ``fraction`` of characters.

    A single document is cut at the last newline before the boundary instead.
    """
    if not docs:
        raise ValueError("corpus is empty")
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - fraction))
        nl = text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        return [text[:cut]], [text[cut:]]
    total = sum(len(d) for d in docs)
    start, k = 0, 0
    while k < len(docs) and start < total * (1 - fraction):
        start += len(docs[k])
        k += 1
    k = min(max(k, 1), len(docs) - 1)  # both sides non-empty
    return docs[:k], docs[k:]


# ----------------------------------------------------------------------------- pydoc

# Stdlib modules whose docstrings make the pydoc corpus. A fixed, sorted list (not a scan of
# sys.modules) so the text depends only on the Python version.
_PYDOC_MODULE_LIST = """
        abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv
        dataclasses datetime decimal difflib email enum fractions ftplib functools getopt
        gettext glob gzip hashlib heapq hmac html http.client http.server imaplib inspect io
        ipaddress itertools json logging mailbox math mimetypes multiprocessing numbers
        operator optparse os pathlib pickle pprint queue random re sched secrets selectors
        shlex shutil smtplib socket socketserver sqlite3 statistics string struct subprocess
        tarfile tempfile textwrap threading timeit tokenize traceback typing unittest
        urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile zoneinfo
"""
PYDOC_MODULES = tuple(sorted(_PYDOC_MODULE_LIST.split()))


def pydoc_documents() -> list[str]:
    """Docstrings of ``PYDOC_MODULES`` and their public classes, functions and methods."""
    import importlib
    import inspect

    docs: list[str] = []
    for modname in PYDOC_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # e.g. a Python built without sqlite3/tkinter
            continue
        objs: list[object] = [mod]
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                objs.append(obj)
                objs.extend(
                    v
                    for k, v in sorted(vars(obj).items())
                    if not k.startswith("_") and inspect.isfunction(v)
                )
            elif inspect.isfunction(obj):
                objs.append(obj)
        for obj in objs:
            with warnings.catch_warnings():  # e.g. typing.io's deprecation on attribute access
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                docs.append(doc)
    return list(dict.fromkeys(docs))  # drop repeats (inherited docs), keep order


# ----------------------------------------------------------------------------- corpora


def _text_documents(path: Path) -> list[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise MissingDataError(f"no .txt files under {path}")
    docs: list[str] = []
    for f in files:
        if not f.is_file():
            raise MissingDataError(f"text corpus file {f} does not exist")
        docs.extend(split_paragraphs(_read(f)))
    if not docs:
        what = f"{len(files)} .txt file(s) under {path}" if path.is_dir() else f"file {path}"
        raise CorpusError(
            f"text corpus {what} holds no text (empty or only blank lines): "
            "point --dataset text:PATH at a file or folder with text"
        )
    return docs


def _tinystories(
    data_dir: Path | None, cache_dir: Path, fraction: float
) -> tuple[list[str], list[str], str]:
    full = _local("tinystories/TinyStories-train.txt", data_dir, cache_dir)
    part = _local("tinystories/TinyStories-train.first2316stories.txt", data_dir, cache_dir)
    train_file = full or part or fetch("tinystories/TinyStories-train.txt", data_dir, cache_dir)
    train = split_stories(_read(train_file))
    valid = _local("tinystories/TinyStories-valid.txt", data_dir, cache_dir)
    if valid is None and train_file.name == "TinyStories-train.txt":
        valid = fetch("tinystories/TinyStories-valid.txt", data_dir, cache_dir)
    if valid is not None:
        return train, split_stories(_read(valid)), valid.name
    return (*tail_split(train, fraction), f"tail {fraction:.0%} of {train_file.name}")


def load_corpus(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    eval_split: str = "validation",
) -> Corpus:
    """Load a corpus by name (see the module docstring for names and sources).

    Args:
      eval_fraction: held-out tail fraction for corpora without a validation file.
      eval_split: "validation" or "test"; "test" needs a corpus with a test file
        (wikitext2); wikitext2-valtrain always evaluates on test.
    """
    ddir, cdir = data_dir_from(data_dir), cache_dir_from(cache_dir)
    tail = f"tail {eval_fraction:.0%}"
    if eval_split == "test" and name not in ("wikitext2", "wikitext2-valtrain"):
        raise ValueError(f"corpus {name!r} has no test split; use eval_split='validation'")
    if name == "tinyshakespeare":
        docs = split_paragraphs(_read(fetch("tinyshakespeare/input.txt", ddir, cdir)))
        return Corpus(name, *tail_split(docs, eval_fraction), tail)
    if name == "tinystories":
        return Corpus(name, *_tinystories(ddir, cdir, eval_fraction))
    if name in ("wikitext2", "wikitext2-valtrain"):
        train_rel = "wikitext-2/train.txt" if name == "wikitext2" else "wikitext-2/valid.txt"
        eval_rel = "wikitext-2/test.txt"
        if name == "wikitext2" and eval_split == "validation":
            eval_rel = "wikitext-2/valid.txt"
        train = split_articles(_read(fetch(train_rel, ddir, cdir)))
        evals = split_articles(_read(fetch(eval_rel, ddir, cdir)))
        return Corpus(name, train, evals, eval_rel)
    if name == "pydoc":
        return Corpus(name, *tail_split(pydoc_documents(), eval_fraction), tail)
    if name.startswith("text:"):
        docs = _text_documents(Path(name[5:]).expanduser())
        return Corpus(name, *tail_split(docs, eval_fraction), tail)
    valid = ", ".join((*CORPUS_NAMES, "text:PATH"))
    raise ValueError(f"unknown corpus {name!r}: valid names are {valid}")
