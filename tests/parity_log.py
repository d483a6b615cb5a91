"""Per-key parity error log: one JSON line per compared fixture key, when asked for.

With ``QPF_PARITY_LOG=PATH`` set, every parity comparison helper calls ``record`` for every
key it compares (passing or failing), which appends one line to ``PATH``::

    {"test": "tests/test_x.py::test_y[float64]", "fixture": "file.npz" | null, "key": ...,
     "max_abs": max|ours - ref|, "max_ref": max|ref|, "max_rel": max_abs / max(max_ref, tiny),
     "shape": [...], "exact": bool (integer/bool/str references) | null (floats), ...}

Unset, ``record`` returns at once. Each line is one ``os.write`` on a file opened with
``O_APPEND``, so two pytest-xdist workers appending to one log do not interleave lines.
Non-finite errors (NaN where the reference is finite, or the reverse) are written as null;
entries NaN on both sides count as equal. ``tests/parity_report.py`` turns a log into
per-system markdown tables. ``QPF_PARITY_LOG_TAG`` (optional) is stored as ``tag`` on every
line (a subprocess rerun of a parity test sets it to tell its lines apart).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ENV = "QPF_PARITY_LOG"
TAG_ENV = "QPF_PARITY_LOG_TAG"
TINY = 1e-30
_PHASE = re.compile(r" \((setup|call|teardown)\)$")
_current_fixture: dict[str, str] = {}  # test id -> fixture file name being checked


def current_test() -> str:
    """The running pytest node id (``PYTEST_CURRENT_TEST`` without its phase suffix)."""
    return _PHASE.sub("", os.environ.get("PYTEST_CURRENT_TEST", ""))


def name_fixture(name: str) -> None:
    """Tag the running test's later records with the fixture file ``name``."""
    _current_fixture[current_test()] = name


def each_fixture(paths: Iterable[Path]) -> Iterator[Path]:
    """Iterate fixture files, tagging the records made meanwhile with the file's name."""
    test = current_test()
    try:
        for path in paths:
            _current_fixture[test] = Path(path).name
            yield path
    finally:
        _current_fixture.pop(test, None)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def errors(ours: Any, ref: Any) -> dict[str, Any]:
    """max_abs, max_ref, max_rel, exact of ``ours`` against ``ref`` (same shape)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    exact_kind = ref.dtype.kind in "biuSUO"
    if ref.dtype.kind in "SUO" or ours.dtype.kind in "SUO":
        same = ours.shape == ref.shape and bool(np.array_equal(ours, ref))
        return {"max_abs": None, "max_ref": None, "max_rel": None, "exact": same}
    kind = np.complex128 if np.iscomplexobj(ours) or np.iscomplexobj(ref) else np.float64
    o, r = ours.astype(kind), ref.astype(kind)
    equal = (o == r) | (np.isnan(o) & np.isnan(r))
    with np.errstate(invalid="ignore"):
        err = np.where(equal, 0.0, np.abs(o - r))
    max_abs = float(np.max(err, initial=0.0)) if not np.isnan(err).any() else math.nan
    mag = np.abs(r)
    max_ref = float(np.max(mag[np.isfinite(mag)], initial=0.0))
    return {
        "max_abs": _finite_or_none(max_abs),
        "max_ref": max_ref,
        "max_rel": _finite_or_none(max_abs / max(max_ref, TINY)),
        "exact": bool(equal.all()) if exact_kind else None,
    }


def record(
    key: str,
    ours: Any,
    ref: Any,
    *,
    fixture: str | None = None,
    note: str | None = None,
    deviation: bool = False,
) -> None:
    """Append the errors of ``ours`` against ``ref`` under ``key`` to ``$QPF_PARITY_LOG``.

    ``ours``, ``ref``: arrays of one shape (any dtype; complex compared as complex).
    ``fixture`` defaults to the file of the enclosing ``each_fixture`` loop, if any.
    ``deviation``: a documented, tested departure from the reference (the report lists it
    apart from the parity errors); ``note`` says which.
    No-op when the variable is unset.
    """
    path = os.environ.get(ENV)
    if not path:
        return
    test = current_test()
    ours, ref = np.asarray(ours), np.asarray(ref)
    line: dict[str, Any] = {
        "test": test,
        "fixture": fixture or _current_fixture.get(test),
        "key": key,
        "shape": list(ref.shape),
        "ref_dtype": str(ref.dtype),
    }
    if ours.shape != ref.shape:
        line.update(max_abs=None, max_ref=None, max_rel=None, exact=None)
        note = f"shape {ours.shape} != reference {ref.shape}" + (f"; {note}" if note else "")
    else:
        line.update(errors(ours, ref))
    if note:
        line["note"] = note
    if deviation:
        line["deviation"] = True
    if tag := os.environ.get(TAG_ENV):
        line["tag"] = tag
    data = (json.dumps(line, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
