"""Smoke test of ``experiments.compare``: tiny models trained on the TinyStories slice."""

from __future__ import annotations

import json
import math

import pytest
from tiny_configs import CLI_MODELS, CLI_TINY_OVERRIDES

from experiments import compare

TINY = CLI_TINY_OVERRIDES
MODELS = CLI_MODELS


@pytest.mark.slow
def test_compare_trains_all_models_on_equal_tokens(tmp_path, data_dir):
    out = tmp_path / "cmp"
    args = ["--models", MODELS, "--data-dir", str(data_dir), "--out", str(out)]
    args += ["--tokens", "6144", "--seq-len", "32", "--batch-size", "8"]
    args += ["--eval-every-tokens", "2048", "--eval-batches", "2", "--lr", "1e-2"]
    for s in TINY:
        args += ["--set", s]
    results = compare.main(args)
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    assert [m["model"] for m in saved["models"]] == MODELS.split(",")
    curves = [[p["tokens"] for p in m["val_curve"]] for m in saved["models"]]
    assert curves[0] == [0, 2048, 4096, 6144]
    assert all(c == curves[0] for c in curves)  # evaluated at equal token counts
    for m in saved["models"]:
        assert m["tokens"] == 6144
        assert m["steps"] == 24
        assert m["ln_vocab"] == pytest.approx(math.log(259))
        assert m["initial_val_loss"] == pytest.approx(m["ln_vocab"], abs=0.2)
        # Something was learned: well below the uniform prediction.
        assert m["val_loss"] < m["ln_vocab"] - 0.3
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
        assert 0 < m["val_bpb"] < m["val_loss"] / math.log(2) + 1e-9
        assert m["train_s"] > 0
        assert m["train_curve"]
        assert (out / m["model"].replace(":", "-") / "metrics.jsonl").exists()
    assert (out / "curves.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert all(f"| {spec} |" in md for spec in MODELS.split(","))


def test_schedule_from_token_budget():
    args = compare.parse_args(["--tokens", "10000", "--seq-len", "10", "--batch-size", "4"])
    sched = compare.Schedule.from_args(args)
    assert (sched.tokens_per_step, sched.steps, sched.eval_every) == (40, 250, 50)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "10"], "less than one step"),
        (["--set", "data.seq_len=8"], "must be equal for all models"),
        (["--set", "mamba:model.dim=8"], "matches none of the models"),
        (["--models", "transformer:nope"], "unknown transformer preset"),
    ],
)
def test_bad_options_fail_before_training(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--models", "transformer:tiny", "--out", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_run_dir_is_refused(tmp_path, capsys):
    (tmp_path / "transformer-tiny").mkdir()
    with pytest.raises(SystemExit):
        compare.main(["--models", "transformer:tiny", "--out", str(tmp_path)])
    assert "choose a new --out" in capsys.readouterr().err
