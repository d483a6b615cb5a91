"""The parity log (tests/parity_log.py) and its per-key report (tests/parity_report.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import parity_log
import parity_report
import pytest


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "parity.jsonl"
    monkeypatch.setenv(parity_log.ENV, str(path))
    monkeypatch.delenv(parity_log.TAG_ENV, raising=False)
    return path


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_appends_one_line_per_key_with_its_errors(log):
    parity_log.record("a/float", np.array([1.0, -2.5, 4.0]), np.array([1.0, -2.0, 4.0]))
    parity_log.record("a/int", np.array([[1, 2]]), np.array([[1, 3]], np.int32))
    first, second = lines(log)
    assert first == {
        "test": "tests/test_parity_log.py::test_record_appends_one_line_per_key_with_its_errors",
        "fixture": None,
        "key": "a/float",
        "shape": [3],
        "ref_dtype": "float64",
        "max_abs": 0.5,
        "max_ref": 4.0,
        "max_rel": 0.125,
        "exact": None,
    }
    assert (second["key"], second["exact"], second["max_abs"]) == ("a/int", False, 1.0)


def test_record_nan_shapes_and_fixture_tags(log):
    both_nan = np.array([np.nan, 1.0])
    parity_log.record("nan both", both_nan, both_nan)
    for _ in parity_log.each_fixture(["/x/f1.npz"]):
        parity_log.record("nan ours", [np.nan, 1.0], [0.0, 1.0])
        parity_log.record("shape", np.zeros(2), np.zeros(3))
    parity_log.record("after", 1.0, 1.0)
    recs = {r["key"]: r for r in lines(log)}
    assert (recs["nan both"]["max_abs"], recs["nan both"]["fixture"]) == (0.0, None)
    assert (recs["nan ours"]["max_abs"], recs["nan ours"]["fixture"]) == (None, "f1.npz")
    assert recs["shape"]["note"] == "shape (2,) != reference (3,)"
    assert recs["after"]["fixture"] is None


def test_record_is_a_no_op_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv(parity_log.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    parity_log.record("k", np.ones(3), np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_report_aggregates_records_into_rows_per_system_and_dtype():
    base = {"fixture": "f.npz", "shape": [2], "exact": None, "ref_dtype": "float64"}
    recs = [
        {**base, "test": "tests/test_rgd.py::test_r[float64]", "key": "g", "max_abs": 1e-12,
         "max_ref": 2.0, "max_rel": 5e-13},
        {**base, "test": "tests/test_rgd.py::test_r[float64]", "key": "g", "max_abs": 3e-12,
         "max_ref": 1.0, "max_rel": 3e-12},
        {**base, "test": "tests/test_lightwave.py::test_m[float32]", "key": "h", "max_abs": 1e-6,
         "max_ref": 10.0, "max_rel": 1e-7, "deviation": True},
    ]  # fmt: skip
    by_system = parity_report.rows(recs)
    assert sorted(by_system) == ["lightwave", "wavegpt"]
    (g,) = by_system["wavegpt"]
    assert (g.key, g.max_abs, g.max_ref, g.max_rel, g.count) == ("g", 3e-12, 2.0, 3e-12, 2)
    assert parity_report.dtype_of(g.test) == "float64"
    text = parity_report.markdown(by_system)
    assert "| `test_r[float64]` | f.npz | `g` | 2 | float64 | 3e-12 | 2 | 3e-12 |  |  |" in text
    assert "- **wavegpt, float64**: 1 keys; worst abs 3e-12 (`g`), worst rel 3e-12 (`g`)" in text
    assert "- **lightwave, float32**: 1 keys; 1 documented deviations (`h`; see notes)" in text


def test_two_processes_appending_at_once_write_whole_lines(log):
    """As two pytest-xdist workers do: every line intact, none lost."""
    code = (
        "import numpy as np, parity_log\n"
        "for i in range(300):\n"
        "    parity_log.record(f'{sys.argv[1]}/' + 'k' * 3000 + f'/{i}', np.ones(2), np.ones(2))\n"
    )
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": tests}
    procs = [
        subprocess.Popen([sys.executable, "-c", "import sys\n" + code, w], env=env)
        for w in ("w0", "w1")
    ]
    assert [p.wait() for p in procs] == [0, 0]
    keys = [r["key"] for r in lines(log)]
    assert sorted(keys) == sorted(f"{w}/{'k' * 3000}/{i}" for w in ("w0", "w1") for i in range(300))
