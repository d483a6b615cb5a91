"""wave_ablation: the protocol's structure (rows, budgets, held-out evaluation windows)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import wave_ablation as wa

ORIGINAL_EIGHT = {
    "baseline",
    "rgd_only",
    "full_physics",
    "qfe_only",
    "pure_wave",
    "pure_wave_linear",
    "pure_wave_sigmoid",
    "pure_wave_exp",
}
WAVE = {
    "dim": 16,
    "num_layers": 1,
    "num_heads": 2,
    "num_waves": 3,
    "num_harmonics": 2,
    "max_len": 8,
}
CLASSIC = {"dim": 16, "num_layers": 1, "num_heads": 2, "max_len": 8, "dropout": 0.1}


def test_honest_rows_share_the_budget_and_cover_the_original_eight():
    specs = wa.honest_specs(WAVE, CLASSIC)
    names = {s.name for s in specs}
    assert names >= ORIGINAL_EIGHT
    assert any(s.family == "transformer" for s in specs)
    assert {s.steps_factor for s in specs} == {1}  # equal steps and tokens
    real = next(s for s in specs if s.name == "pure_wave_linear (real)")
    assert wa.build(real)[1].linear
    # The original's pure_wave_linear ran the quadratic model (its mode was never passed).
    assert not wa.build(next(s for s in specs if s.name == "pure_wave_linear"))[1].linear


def test_published_protocol_gives_the_wave_model_three_times_the_steps():
    classic, wave = wa.published_specs(WAVE, CLASSIC)
    assert (classic.steps_factor, wave.steps_factor) == (1, 3)
    assert (classic.lr, wave.lr) == (3e-4, 6e-4)
    assert wave.rgd
    assert wave.qfe_lambda == 0.05


def test_validation_windows_cover_the_whole_split():
    val = np.arange(101)
    win = wa.val_windows(val, 10)
    assert win.shape == (10, 11)
    # Targets of consecutive windows tile the split without gaps or overlap.
    np.testing.assert_array_equal(win[:, 1:].ravel(), val[1:101])


def test_seed_rows_average_with_their_spread_in_the_table():
    row = {"params": 10, "steps": 3, "tokens": 96, "rgd": False, "qfe_lambda": 0.0}
    rows = [
        {**row, "name": "baseline", "val_ce_full": v, "train_batch_ce": v, "train_seconds": 1.0}
        for v in (3.0, 3.2, 3.4)
    ]
    (avg,) = wa.mean_rows(rows)
    assert avg["val_ce_full"] == pytest.approx(3.2)
    assert avg["val_ce_sd"] == pytest.approx(0.2)  # sample standard deviation
    assert avg["seeds"] == 3
    assert "| baseline | 10 | 3 | 96 | – | – | 3.2000 | 0.2000 | 3 | 1.0 |" in wa.table(
        [avg], published=False
    )
