"""Smoke test of experiments/benchmark_scan.py at tiny sizes on CPU."""

from __future__ import annotations

import json

import jax

from experiments import benchmark_scan


def test_benchmark_runs_every_backend_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--seq-lens", "5", "--batch", "1", "--state-dim", "3", "--repeats", "1"]
    argv += ["--backends", "sequential/u16,chunked,pallas"]  # each case is a compile: keep few
    # The kernel itself is tested in test_kernels.py; here pallas is skipped (CPU) or compiled.
    result = benchmark_scan.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["backend"], r["mode"]): r for r in result["rows"]}
    labels = ["sequential/u16", "chunked/c128", "pallas"]
    assert set(rows) == {(b, m) for b in labels for m in ("fwd", "fwd+bwd")}
    for (label, _), row in rows.items():
        if label == "pallas" and jax.default_backend() == "cpu":
            assert "skipped" in row
            continue
        assert "error" not in row, row
        assert row["median_ms"] > 0
        assert row["floor_ms"] > 0
    # 5 elements per (b, t, n) forward, 17 forward+backward, float32, at 4800 GB/s.
    assert rows["pallas", "fwd"]["floor_ms"] == 1e3 * 5 * 15 * 4 / 4.8e12
    assert rows["pallas", "fwd+bwd"]["floor_ms"] == 1e3 * 17 * 15 * 4 / 4.8e12


def test_pallas_is_skipped_on_cpu_and_failures_become_error_rows(monkeypatch):
    argv = ["--seq-lens", "3", "--batch", "1", "--state-dim", "2", "--repeats", "1"]
    result = benchmark_scan.run(benchmark_scan.parse_args([*argv, "--backends", "pallas"]))
    if jax.default_backend() == "cpu":
        assert all("skipped" in r for r in result["rows"])

    def broken(backend):
        def fn(*args):
            raise RuntimeError("lowering failed")

        return fn

    monkeypatch.setattr(benchmark_scan, "scan_fn", broken)
    result = benchmark_scan.run(benchmark_scan.parse_args([*argv, "--backends", "associative"]))
    assert [r["error"] for r in result["rows"]] == ["RuntimeError: lowering failed"] * 2
    assert "error" in benchmark_scan.markdown(result)
