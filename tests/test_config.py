"""Config validation, serialisation and overrides."""

from __future__ import annotations

import json

import pytest

from qpf import config as cfgs
from qpf.presets import get_preset


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: cfgs.BackboneConfig(scan_type="fast"), "BackboneConfig.scan_type"),
        (lambda: cfgs.BackboneConfig(state_dim=0), "BackboneConfig.state_dim"),
        (lambda: cfgs.SemanticBankConfig(dropout=1.0), "SemanticBankConfig.dropout"),
        (lambda: cfgs.EpisodicConfig(regime="global"), "EpisodicConfig.regime"),
        (lambda: cfgs.ModelConfig(input_mode="chars"), "ModelConfig.input_mode"),
        (lambda: cfgs.ModelConfig(dtype="float16"), "ModelConfig.dtype"),
        (lambda: cfgs.ModelConfig(input_mode="byte_patch", vocab_size=100), "vocab_size"),
        (
            lambda: cfgs.ModelConfig(banks=(cfgs.SemanticBankConfig(),) * 2),
            "ModelConfig.banks",
        ),
        (lambda: cfgs.MorphologyEmbedConfig(prefix_vocab_size=3), "prefix_vocab_size"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(build, field):
    with pytest.raises(cfgs.ConfigError, match=field.replace(".", r"\.")) as err:
        build()
    assert "allowed" in str(err.value)


def test_every_preset_round_trips_through_json():
    for name in ("tiny", "large", "small-byte"):
        model = get_preset(name).model
        data = json.loads(cfgs.to_json(model))
        assert cfgs.from_dict(cfgs.ModelConfig, data) == model
        hash(model)  # configs are static jit arguments


def test_unknown_fields_and_bank_types_are_rejected():
    with pytest.raises(cfgs.ConfigError, match="unknown field"):
        cfgs.from_dict(cfgs.ModelConfig, {"dims": 3})
    with pytest.raises(cfgs.ConfigError, match="allowed semantic, context"):
        cfgs.from_dict(cfgs.ModelConfig, {"banks": [{"type": "visual"}]})


def test_overrides_apply_dotted_paths_and_validate():
    base = get_preset("tiny").model
    cfg = cfgs.apply_overrides(
        base,
        {
            "backbone.state_dim": "96",
            "banks": "semantic,context",
            "memory": "null",
            "episodic.regime": "sliding",
            "coupler.dynamic_routing": "false",
        },
    )
    assert cfg.backbone.state_dim == 96
    assert cfg.bank_names == ("semantic", "context")
    assert cfg.memory is None
    assert cfg.episodic.regime == "sliding"
    assert cfg.coupler.dynamic_routing is False
    with pytest.raises(cfgs.ConfigError, match="no field"):
        cfgs.apply_overrides(base, {"backbone.depth": "3"})
    with pytest.raises(cfgs.ConfigError, match="scan_type"):
        cfgs.apply_overrides(base, {"backbone.scan_type": "warp"})
    with pytest.raises(cfgs.ConfigError, match="disabled"):
        cfgs.apply_overrides(cfg, {"memory.num_slots": "3"})
