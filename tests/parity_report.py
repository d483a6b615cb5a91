"""Per-key parity errors as markdown: ``python tests/parity_report.py LOG.jsonl [--md OUT.md]``.

Reads the JSON lines ``tests/parity_log.py`` appends (``QPF_PARITY_LOG=LOG.jsonl pytest -k
parity tests/``) and writes, per system (from the test file), a one-line summary per dtype
(worst max abs and max rel error over every key) and a table of every (test, fixture, key):
max abs error, max |ref|, max rel error (= max abs / max |ref|), exactness of integer keys.
A key logged more than once by one test (e.g. per layer) keeps its worst errors.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMS = {
    "test_torch_weights": "qpf (v4)",
    "test_memory": "qpf (v4)",
    "test_banks": "qpf (v4)",
    "test_core": "qpf (v4)",
    "test_embeddings": "qpf (v4)",
    "test_norms": "qpf (v4)",
    "test_ssm": "qpf (v4)",
    "test_lightwave": "lightwave",
    "test_qllm_compat": "qllm",
    "test_wavegpt": "wavegpt",
    "test_qfe": "wavegpt",
    "test_rgd": "wavegpt",
    "test_qllm_v2": "v2 (qllm_v2)",
    "test_qllm_v3_parity": "v3 (qllm_v3)",
}
_F64 = re.compile(r"float64|\bf64\b|[\[-]f64[\]-]")


def system_of(test: str) -> str:
    """The system a pytest node id belongs to, from its test file's name."""
    stem = Path(test.split("::", 1)[0]).stem
    return SYSTEMS.get(stem, stem)


def dtype_of(test: str) -> str:
    """'float64' when the node id names float64 (``float64``, ``f64``), else 'float32'."""
    return "float64" if _F64.search(test.split("::", 1)[-1]) else "float32"


def _worst(a: float | None, b: float | None) -> float | None:
    """Max where None (a non-finite error) is the worst."""
    if a is None or b is None:
        return None
    return max(a, b)


@dataclass
class Row:
    """The errors of one (test, fixture, key), worst over its records."""

    test: str
    fixture: str
    key: str
    shape: list[int]
    max_abs: float | None = 0.0
    max_ref: float | None = 0.0
    max_rel: float | None = 0.0
    exact: bool | None = None
    ref_dtype: str = ""
    deviation: bool = False
    count: int = 0
    notes: set[str] = field(default_factory=set)

    def add(self, rec: dict) -> None:
        if self.count == 0:
            self.max_abs, self.max_ref, self.max_rel = (
                rec["max_abs"],
                rec["max_ref"],
                rec["max_rel"],
            )
            self.exact = rec["exact"]
        else:
            self.max_abs = _worst(self.max_abs, rec["max_abs"])
            self.max_rel = _worst(self.max_rel, rec["max_rel"])
            self.max_ref = max(self.max_ref or 0.0, rec["max_ref"] or 0.0)
            if rec["exact"] is not None:
                self.exact = rec["exact"] and self.exact is not False
        self.count += 1
        self.ref_dtype = rec.get("ref_dtype", "")
        self.deviation = self.deviation or bool(rec.get("deviation"))
        if rec.get("note"):
            self.notes.add(rec["note"])


def rows(records: Iterable[dict]) -> dict[str, list[Row]]:
    """{system: rows sorted by test, fixture, key}."""
    table: dict[tuple[str, str, str], Row] = {}
    for rec in records:
        test = rec["test"] + (f" [{rec['tag']}]" if rec.get("tag") else "")
        ident = (test, rec.get("fixture") or "", rec["key"])
        if ident not in table:
            table[ident] = Row(*ident, shape=rec["shape"])
        table[ident].add(rec)
    out: dict[str, list[Row]] = {}
    for ident in sorted(table):
        out.setdefault(system_of(ident[0]), []).append(table[ident])
    return out


def fmt(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.3g}"


def worst(rs: list[Row]) -> str:
    """'worst abs A (`key`), worst rel R (`key`)' over the rows with finite errors."""
    finite = [r for r in rs if r.max_abs is not None and r.max_rel is not None]
    if not finite:
        return "no finite errors"
    a = max(finite, key=lambda r: r.max_abs)
    r = max(finite, key=lambda r: r.max_rel)
    return f"worst abs {fmt(a.max_abs)} (`{a.key}`), worst rel {fmt(r.max_rel)} (`{r.key}`)"


def summary(system: str, dtype: str, rs: list[Row]) -> str:
    """One line: worst abs and rel error over the float keys (in a float64 run, those with
    a float64 reference; the rest, checked against the float32 reference, apart), exact-key
    matches, documented deviations (kept out of the worst errors)."""
    kept = [r for r in rs if not r.deviation]
    floats = [r for r in kept if r.exact is None and r.max_ref is not None]
    exact = [r for r in kept if r.exact is not None]
    vs32 = [r for r in floats if dtype == "float64" and r.ref_dtype != "float64"]
    main = [r for r in floats if r not in vs32]
    parts = [f"**{system}, {dtype}**: {len(rs)} keys"]
    if main:
        parts.append(worst(main))
    if vs32:
        parts.append(f"{len(vs32)} keys with no float64 reference, vs float32: {worst(vs32)}")
    if nonfinite := [r for r in floats if r.max_abs is None]:
        parts.append(f"{len(nonfinite)} non-finite: " + ", ".join(f"`{r.key}`" for r in nonfinite))
    if exact:
        parts.append(f"{sum(bool(r.exact) for r in exact)}/{len(exact)} exact keys equal")
    if deviations := [r for r in rs if r.deviation]:
        keys = ", ".join(sorted({f"`{r.key}`" for r in deviations}))
        parts.append(f"{len(deviations)} documented deviations ({keys}; see notes)")
    return "; ".join(parts)


INTRO = (
    "Produced by `tests/parity_report.py` from the `QPF_PARITY_LOG` of the parity tests "
    "(README, Test). max rel = max abs error / max |ref| over the key; exact: integer, bool "
    "and text keys compared for equality. In float64 runs, keys the fixture stores only in "
    "float32 are checked against that float32 reference (their errors are float32 rounding) "
    "and summarised apart. Documented deviations (the original's known bugs) are kept out of "
    "the worst errors. A test id tagged `[XLA default optimisation level]` is the subprocess "
    "rerun of `tests/test_scan.py`."
)
HEADER = (
    "| test | fixture | key | shape | ref dtype | max abs err | max \\|ref\\| | max rel err "
    "| exact | note |"
)


def table_row(r: Row) -> str:
    exact = "" if r.exact is None else ("yes" if r.exact else "**NO**")
    shape = "x".join(map(str, r.shape)) or "scalar"
    return (
        f"| `{r.test.split('::', 1)[-1]}` | {r.fixture} | `{r.key}` | {shape} | {r.ref_dtype} | "
        f"{fmt(r.max_abs)} | {fmt(r.max_ref)} | {fmt(r.max_rel)} | {exact} | "
        f"{'; '.join(sorted(r.notes))} |"
    )


def markdown(by_system: dict[str, list[Row]]) -> str:
    """Summaries per system and dtype, then one table per system."""
    lines = ["# Parity errors per key", "", INTRO, "", "## Summary", ""]
    for system, rs in by_system.items():
        for dtype in ("float32", "float64"):
            if sub := [r for r in rs if dtype_of(r.test) == dtype]:
                lines.append(f"- {summary(system, dtype, sub)}")
    for system, rs in by_system.items():
        lines += ["", f"## {system}", "", HEADER, "|---" * 10 + "|"]
        lines += [table_row(r) for r in rs]
    return "\n".join(lines) + "\n"


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the QPF_PARITY_LOG file (JSON lines)")
    parser.add_argument("--md", type=Path, help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    text = markdown(rows(read_log(args.log)))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
