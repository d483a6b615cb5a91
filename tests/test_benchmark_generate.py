"""Smoke test of the generation benchmark at tiny sizes."""

from __future__ import annotations

import json

from experiments import benchmark_generate

TINY = [
    "dim=8",
    "vocab_size=61",
    "backbone.state_dim=8",
    "backbone.num_layers=1",
    "memory.num_slots=7",
    "memory.top_k=3",
    "episodic.window=8",
]


def test_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--models", "qpf:tiny", "--contexts", "64,128", "--new-tokens", "4"]
    args += ["--chunk-size", "64", "--json", str(out)]
    for s in TINY:
        args += ["--set", s]
    rows = benchmark_generate.main(args)
    assert [r["context"] for r in rows] == [64, 128]
    for r in rows:
        assert r["prefill_tokens_per_s"] > 0
        assert r["decode_tokens_per_s"] > 0
        assert r["peak_memory_mib"] > 0
    assert json.loads(out.read_text()) == rows
    assert "| qpf:tiny | 128 |" in capsys.readouterr().out
