"""Smoke tests of the side-by-side benchmark (``experiments.benchmark``) at tiny sizes."""

from __future__ import annotations

import json
import math

import pytest
from tiny_configs import CLI_MODELS, CLI_TINY_OVERRIDES

from experiments import benchmark
from experiments.model_set import overrides_for, parse_overrides
from qpf.config import ConfigError
from qpf.models.param_count import family_param_count
from qpf.training.config import RunConfig
from qpf.zoo import resolve_model

MODELS = CLI_MODELS
TINY = CLI_TINY_OVERRIDES


def tiny_args(*extra: str) -> list[str]:
    args = ["--models", MODELS, "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    args += ["--vocab-size", "61", *extra]
    for s in TINY:
        args += ["--set", s]
    return args


def expected_params(spec: str) -> int:
    """``family_param_count`` of the model the benchmark builds for ``spec``."""
    family, preset = resolve_model(spec)
    args = benchmark.parse_args(tiny_args("--seq-len", "16"))
    scoped = parse_overrides(TINY, MODELS.split(","))
    run: RunConfig = benchmark.run_config(spec, preset, args, overrides_for(spec, scoped))
    return family_param_count(family, run.model_config)


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    records = benchmark.main(tiny_args("--seq-len", "16", "--json", str(out), "--md", str(md)))
    assert json.loads(out.read_text()) == records
    assert [r["model"] for r in records] == MODELS.split(",")
    for r in records:
        assert r["seq_len"] == 16
        assert r["batch"] == 2
        assert r["vocab_size"] == 61
        for key in ("compile_s", "train_tokens_per_s", "forward_tokens_per_s", "step_ms"):
            assert math.isfinite(r[key]), key
            assert r[key] > 0, key
        assert r["peak_mem_bytes"] > 0
        assert r["compiled_mem_bytes"] > 0
        assert r["params"] == expected_params(r["model"])
        assert r["repeats"] == 2
        if r["head_ms"] is not None:  # the head's three matmuls, timed at the step's shapes
            assert r["head_matmul_ms"] > 0
            assert r["head_over_matmuls"] == pytest.approx(r["head_ms"] / r["head_matmul_ms"])
    assert any(r["head_ms"] is not None for r in records)
    text = capsys.readouterr().out
    assert md.read_text().strip() in text
    # The "x first" columns are tokens/s ratios against the first model.
    first = records[0]
    for r in records:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['model']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[6]) == pytest.approx(
            r["train_tokens_per_s"] / first["train_tokens_per_s"], abs=0.006
        )
        assert float(cells[8]) == pytest.approx(
            r["forward_tokens_per_s"] / first["forward_tokens_per_s"], abs=0.006
        )


def test_scaling_table_from_records():
    recs = [
        {"model": m, "seq_len": t, "step_ms": ms}
        for m, t, ms in (("a", 16, 2.0), ("a", 64, 8.0), ("b", 16, 1.0), ("b", 64, 1.5))
    ]
    text = benchmark.scaling_markdown(recs)
    assert "| a | 2.0 (1.00) | 8.0 (4.00) |" in text
    assert "| b | 1.0 (1.00) | 1.5 (1.50) |" in text
    assert "gives 1, 4." in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--models", "qpf:nope"], "unknown qpf preset"),
        (["--models", "nofamily:tiny"], "nofamily"),
        (["--set", "mamba:model.dim=8"], "matches none of the models"),
        (["--set", "model.no_such_field=1"], "no field"),
        (["--set", "data.seq_len=8"], "the benchmark takes sections"),
        (["--seq-lens", "16,x"], "expected integers"),
    ],
)
def test_bad_options_fail_clearly(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--models", "transformer:tiny", "--steps", "1", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_scoped_overrides_parse():
    specs = ["qpf:tiny", "transformer:tiny"]
    items = parse_overrides(["model.dim=8", "transformer:tiny:model.num_heads=2"], specs)
    assert [o.applies_to("qpf:tiny") for o in items] == [True, False]
    assert [o.applies_to("transformer:tiny") for o in items] == [True, True]
    with pytest.raises(ConfigError, match="expected"):
        parse_overrides(["model.dim"], specs)
