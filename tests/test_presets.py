"""Presets: all eight exist, and their sizes equal the original's minus its dead parameters."""

from __future__ import annotations

import pytest

from qpf import config as cfgs
from qpf.models.param_count import parameter_report
from qpf.presets import PRESETS, get_preset

# The original's "actual" totals in millions (spec §3.2): BPE column for BPE presets, byte
# column for -byte presets.
ORIGINAL_ACTUAL_M = {
    "tiny": 16.04,
    "small": 71.97,
    "medium": 181.72,
    "large": 396.19,
    "tiny-byte": 3.40,
    "small-byte": 22.88,
    "medium-byte": 83.28,
    "large-byte": 195.73,
}


def original_dead_params(preset: str) -> int:
    """Parameters the original creates that never affect its output (spec §22.17)."""
    m = get_preset(preset).model
    d, slots = m.dim, m.memory.num_slots
    dead = 40_000 * d  # morphological embedding tables, present in every mode
    dead += 2 * 512 * d + 2 * 512  # semantic concept_proj
    dead += slots  # memory slot_importance
    if "emotion" in m.bank_names:
        dead += 8  # the emotion detector's imaginary bias (only its real part is used)
    if len(m.banks) == 1:
        dead += (1 * 4 + 4) + (4 * 1 + 1)  # the router, degenerate with one bank
    if m.input_mode == "byte_patch":
        v = 259
        dead += 2 * v * d  # the unused standard embedding
        dead += (2 * d * d + 2 * d) + d + v * 2 * d  # the unused LM head
    return dead


def test_all_eight_presets_exist_and_unknown_names_are_clear_errors():
    assert set(PRESETS) == set(ORIGINAL_ACTUAL_M)
    with pytest.raises(cfgs.ConfigError, match="tiny, small"):
        get_preset("huge")


@pytest.mark.parametrize("name", sorted(ORIGINAL_ACTUAL_M))
def test_parameter_count_is_the_original_minus_its_dead_parameters(name):
    report = parameter_report(get_preset(name).model)
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
    extra = 2 * get_preset(name).model.dim if name.endswith("-byte") else 0  # start_context
    expected = ORIGINAL_ACTUAL_M[name] * 1e6 - original_dead_params(name) + extra
    assert abs(report["total"] - expected) < 0.006e6, (name, report["total"], expected)


def test_medium_breakdown_matches_the_original_components():
    """Spec §3.2 breakdown of medium (counted): banks 5.78M, coupler 1.58M, backbone 44.13M,
    memory 3.15M (with slot_importance), lm_head+output_proj 51.99M, episodic 3.15M."""
    r = parameter_report(get_preset("medium").model)
    concept_proj = 2 * 512 * 512 + 2 * 512
    assert abs(r["bank:semantic"] + r["bank:context"] + concept_proj - 5.78e6) < 0.006e6
    assert abs(r["coupler"] - 1.58e6) < 0.006e6
    assert abs(r["backbone"] - 44.13e6) < 0.006e6
    assert abs(r["memory"] + 1024 - 1 - 3.15e6) < 0.006e6  # minus memory_scale, plus importance
    assert abs(r["lm_head"] - 51.99e6) < 0.006e6
    assert abs(r["episodic"] - 3.15e6) < 0.006e6
