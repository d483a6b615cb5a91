"""Config validation, serialisation and overrides."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest

from qpf import config as cfgs
from qpf.models.contract import cache_length, kv_cache_state
from qpf.models.family import ModelFamily, Preset, presets_from_table
from qpf.models.qllm import QLLMConfig
from qpf.presets import get_preset
from qpf.zoo import family_names, get_family


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
        (
            lambda: cfgs.ModelConfig(input_mode="byte_patch", vocab_size=259, tie_embeddings=True),
            "ModelConfig.tie_embeddings",
        ),
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


# ------------------------------------------------------- the numerics every model config has

NUMERIC_FIELDS = ("dtype", "param_dtype", "matmul_precision")


def _test_config(name: str):
    family = get_family(name)
    return family.preset(family.test_presets()[0]).model


@pytest.mark.parametrize("name", family_names())
def test_every_family_config_inherits_numerics_config_without_redeclaring(name):
    cls = get_family(name).config_cls
    assert issubclass(cls, cfgs.NumericsConfig)
    own = set(vars(cls).get("__annotations__", {}))
    assert not own & set(NUMERIC_FIELDS), f"{cls.__name__} redeclares {own & set(NUMERIC_FIELDS)}"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert all(fields[n].kw_only for n in NUMERIC_FIELDS)  # own fields keep their positions
    assert [fields[n].default for n in NUMERIC_FIELDS] == ["float32", "float32", "default"]


@pytest.mark.parametrize("name", family_names())
@pytest.mark.parametrize(
    ("field", "bad", "allowed"),
    [
        ("dtype", "float16", "one of float32, bfloat16, float64"),
        ("param_dtype", "int8", "one of float32, bfloat16, float64"),
        ("matmul_precision", "fp8", "one of default, float32, tensorfloat32"),
    ],
)
def test_bad_numerics_name_the_family_config_field(name, field, bad, allowed):
    config = _test_config(name)
    cls = type(config).__name__
    with pytest.raises(cfgs.ConfigError, match=rf"^{cls}\.{field} = '{bad}' is invalid: allowed "):
        config.replace(**{field: bad})
    with pytest.raises(cfgs.ConfigError, match=allowed):
        cfgs.from_dict(type(config), {**cfgs.to_dict(config), field: bad})  # a stored config
    good = {"dtype": "bfloat16", "param_dtype": "float64", "matmul_precision": "highest"}[field]
    assert getattr(config.replace(**{field: good}), field) == good


def test_numerics_dtype_names_are_the_contracts_dtypes():
    from qpf.models.contract import DTYPES

    assert tuple(DTYPES) == cfgs.DTYPES


@pytest.mark.parametrize("name", family_names())
def test_stored_family_configs_round_trip_and_old_layouts_still_load(name):
    family = get_family(name)
    changes = {"dtype": "bfloat16", "matmul_precision": "float32"}
    for preset in family.presets.values():
        config = preset.model.replace(**changes)
        stored = json.loads(cfgs.to_json(config))
        assert cfgs.from_dict(family.config_cls, stored) == config
        hash(config)  # configs are static jit arguments
        # A config stored before NumericsConfig: numeric fields last (the old field order)
        # and, older still, without matmul_precision (it then takes its default).
        old = {k: v for k, v in stored.items() if k not in NUMERIC_FIELDS}
        old |= {"dtype": "bfloat16", "param_dtype": "float32"}
        assert cfgs.from_dict(family.config_cls, old) == preset.model.replace(dtype="bfloat16")


def test_a_family_whose_config_does_not_inherit_numerics_config_is_refused():
    @dataclasses.dataclass(frozen=True)
    class PlainConfig:
        family_name: ClassVar[str] = "plain"
        vocab_size: int = 259
        dtype: str = "float32"

    @dataclasses.dataclass(frozen=True)
    class NumericConfig(cfgs.NumericsConfig):
        family_name: ClassVar[str] = "plain"
        vocab_size: int = 259

    qpf = get_family("qpf")
    parts = (qpf.build, qpf.init_state, {})
    with pytest.raises(cfgs.ConfigError, match=r"PlainConfig.* does not inherit .*NumericsConfig"):
        ModelFamily("plain", PlainConfig, *parts)
    with pytest.raises(cfgs.ConfigError, match="does not inherit"):
        ModelFamily("plain", PlainConfig(), *parts)  # an instance is no class either
    assert ModelFamily("plain", NumericConfig, *parts).config_cls is NumericConfig
    assert NumericConfig(259, dtype="bfloat16").replace(vocab_size=256).dtype == "bfloat16"


# ----------------------------------------------------------------- shared family helpers


def test_presets_from_table_builds_validated_presets_in_order():
    table = {"b": ({"dim": 8, "num_layers": 1}, 4, 1e-3), "a": ({"dtype": "bfloat16"}, 2, 5e-4)}
    presets = presets_from_table(QLLMConfig, table)
    assert list(presets) == ["b", "a"]
    assert presets["b"] == Preset("b", QLLMConfig(dim=8, num_layers=1), 4, 1e-3)
    assert presets["a"].model == QLLMConfig(dtype="bfloat16")
    with pytest.raises(cfgs.ConfigError, match=r"QLLMConfig\.dtype = 'half'"):
        presets_from_table(QLLMConfig, {"x": ({"dtype": "half"}, 1, 1e-3)})


def test_kv_cache_state_shapes_dtypes_and_length():
    import jax.numpy as jnp

    config = QLLMConfig(dim=8, num_layers=3, num_heads=2, max_len=5, dtype="bfloat16")
    state = kv_cache_state(config, 4, None, (2, 4))
    assert int(state["pos"]) == 0
    assert state["pos"].dtype == jnp.int32
    assert state["k"].shape == state["v"].shape == (3, 4, 5, 2, 4)  # S = config.max_len
    assert state["k"].dtype == state["v"].dtype == jnp.bfloat16  # the compute dtype
    assert not state["k"].any()
    assert not state["v"].any()
    mixed = kv_cache_state(config, 1, 7, (2, 6), (2, 4), jnp.float32, jnp.bfloat16)
    assert (mixed["k"].shape, mixed["k"].dtype) == ((3, 1, 7, 2, 6), jnp.float32)
    assert (mixed["v"].shape, mixed["v"].dtype) == ((3, 1, 7, 2, 4), jnp.bfloat16)
    assert cache_length(config, None) == 5
    assert cache_length(config, 9) == 9
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):
        kv_cache_state(config, 1, 0, (2, 4))
