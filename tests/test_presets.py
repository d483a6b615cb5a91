"""Presets: all eight exist, and their sizes equal the original's minus its dead parameters;
the four v5 presets are the faithful ones with the documented changes, matched in size to
the transformer presets of the same base name."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from family_checks import future_leaks, perturb_params

from experiments import ablate
from qpf import config as cfgs
from qpf.data.tokenizers import get_tokenizer
from qpf.models.param_count import parameter_report
from qpf.presets import PRESETS, V5_PRESETS, get_preset
from qpf.zoo import family_of, resolve_model

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


# ------------------------------------------------------------------------ faithful table

# Spec §3.2, copied here so that a change to qpf/presets.py's table shows:
# name: (dim, SSM layers, banks, memory slots, batch size, learning rate)
FAITHFUL = {
    "tiny": (64, 4, ("semantic",), 512, 16, 1e-3),
    "small": (256, 8, ("semantic",), 512, 8, 1e-4),
    "medium": (512, 12, ("semantic", "context"), 1024, 4, 5e-5),
    "large": (768, 16, ("semantic", "context", "language", "emotion"), 8192, 2, 3e-5),
    "tiny-byte": (64, 4, ("semantic", "context"), 256, 32, 1e-3),
    "small-byte": (256, 8, ("semantic", "context"), 256, 16, 1e-4),
    "medium-byte": (512, 12, ("semantic", "context"), 512, 8, 5e-5),
    "large-byte": (768, 16, ("semantic",), 1024, 4, 3e-5),
}


@pytest.mark.parametrize("name", sorted(FAITHFUL))
def test_faithful_presets_are_the_table_with_every_other_field_at_its_default(name):
    dim, layers, banks, slots, batch, lr = FAITHFUL[name]
    byte = name.endswith("-byte")
    expected = {
        **cfgs.to_dict(cfgs.ModelConfig()),
        "vocab_size": 259 if byte else 50257,
        "dim": dim,
        "input_mode": "byte_patch" if byte else "token",
        "banks": [cfgs.to_dict(cfgs.BANK_CONFIGS[b]()) for b in banks],
        "backbone": cfgs.to_dict(cfgs.BackboneConfig(state_dim=2 * dim, num_layers=layers)),
        "memory": cfgs.to_dict(cfgs.MemoryConfig(num_slots=slots)),
    }
    preset = get_preset(name)
    assert cfgs.to_dict(preset.model) == expected
    assert (preset.batch_size, preset.learning_rate) == (batch, lr)
    assert resolve_model(f"qpf:{name}")[1] is preset


# ----------------------------------------------------------------------------- v5 presets

V5_BASES = ("tiny", "small", "tiny-byte", "small-byte")
# tiny-v5's screened BPE head changes (qpf.presets._V5_BPE_HEAD), written out again here.
BPE_HEAD = {"tiny": {"num_layers": 6, "learning_rate": 3e-3}}
BPE_HEAD_FIELDS = {"tie_embeddings": True, "head_norm": "rms", "backbone.max_phase": math.pi / 10}


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """A ``to_dict`` tree -> {dotted path: leaf} (lists by index, None and [] as leaves)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree:
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def _changed(base: cfgs.ModelConfig, new: cfgs.ModelConfig) -> dict[str, object]:
    """{path: new value} of every field (or section) of ``new`` that differs from ``base``."""
    a, b = _flat(cfgs.to_dict(base)), _flat(cfgs.to_dict(new))
    out = {k: b.get(k, "<absent>") for k in a if a[k] != b.get(k, "<absent>")}
    out.update({k: v for k, v in b.items() if k not in a})
    return out


def test_v5_presets_exist_resolve_through_the_zoo_and_keep_batch_and_lr():
    assert set(V5_PRESETS) == {f"{b}-v5" for b in V5_BASES}
    assert set(PRESETS) == set(FAITHFUL)  # the faithful eight stay the faithful eight
    for base in V5_BASES:
        family, preset = resolve_model(f"qpf:{base}-v5")
        assert family.name == "qpf"
        assert family_of(preset.model) is family
        assert preset is V5_PRESETS[f"{base}-v5"] is get_preset(f"{base}-v5")
        assert preset.name == f"{base}-v5"
        lr = BPE_HEAD.get(base, {}).get("learning_rate", PRESETS[base].learning_rate)
        assert (preset.batch_size, preset.learning_rate) == (PRESETS[base].batch_size, lr)
        assert preset.tokenizer == PRESETS[base].tokenizer
    with pytest.raises(cfgs.ConfigError, match="tiny-byte-v5"):
        get_preset("tiny-v6")


@pytest.mark.parametrize("base", V5_BASES)
def test_v5_preset_is_its_base_with_only_the_documented_changes(base):
    old, new = PRESETS[base].model, V5_PRESETS[f"{base}-v5"].model
    documented = {
        "backbone.damping_init": 4.0,
        "backbone.dropout": 0.0,
        "backbone.layer_scale_init": 1.0,
        "backbone.ssm": "lru",
        "backbone.selectivity": "rglru",
        "backbone.norm": "rms",
        "coupler.dropout": 0.0,
        "banks": [],
        "memory": None,
        "episodic": None,
    }
    if base.endswith("-byte"):
        documented["input_mode"] = "token"  # plain bytes, vocabulary 259 kept
    if base in BPE_HEAD:
        documented |= BPE_HEAD_FIELDS | {"backbone.num_layers": BPE_HEAD[base]["num_layers"]}
    changed = _changed(old, new)
    # The sections removed (banks, memory, episodic) show as their leaves going absent.
    removed = {k for k, v in changed.items() if v == "<absent>"}
    assert all(k.split(".")[0] in ("banks", "memory", "episodic") for k in removed), removed
    width = ("dim", "backbone.state_dim")  # changed unless the base width already fits
    assert {k: v for k, v in changed.items() if k not in removed | set(width)} == documented
    assert new.backbone.state_dim == 2 * new.dim
    assert new.vocab_size == old.vocab_size
    if base not in BPE_HEAD:
        assert new.backbone.num_layers == old.backbone.num_layers


def test_v5_presets_are_the_ablation_grids_plain_bytes_node_at_their_width():
    """The presets are what ``experiments.ablate`` measured: the v4-to-v5 grid's chain of
    overrides up to ``plain-bytes`` (``rms-norm`` plus plain byte input), then the width."""
    grid = ablate.GRIDS["v4-to-v5"]
    resolved = ablate.resolve_grid(grid, get_tokenizer("byte"), count=lambda f, c: 1000)
    by = {r.variant.name: r for r in resolved}
    assert by["plain-bytes"].variant.parent == "rms-norm"
    chain = dict(by["plain-bytes"].overrides)
    assert chain["input_mode"] == "token"
    for base in V5_BASES:
        v5 = V5_PRESETS[f"{base}-v5"].model
        width = {"dim": v5.dim, "backbone.state_dim": 2 * v5.dim}
        extra = {}
        if base in BPE_HEAD:
            extra = BPE_HEAD_FIELDS | {"backbone.num_layers": BPE_HEAD[base]["num_layers"]}
        assert ablate.apply_overrides(PRESETS[base].model, {**chain, **width, **extra}) == v5


@pytest.mark.parametrize("base", V5_BASES)
def test_v5_preset_is_within_4_percent_of_the_transformer_of_the_same_name(base):
    qpf_family, v5 = resolve_model(f"qpf:{base}-v5")
    tf_family, tf = resolve_model(f"transformer:{base}")
    ours = ablate.count_params(qpf_family, v5.model)  # jax.eval_shape: no weights allocated
    theirs = ablate.count_params(tf_family, tf.model)
    assert abs(ours / theirs - 1) <= 0.04, (base, ours, theirs)


def test_shrunk_tiny_byte_v5_forward_is_finite_and_causal():
    full = V5_PRESETS["tiny-byte-v5"].model
    config = full.replace(dim=6, backbone=dataclasses.replace(full.backbone, state_dim=12))
    family = family_of(config)
    module = family.build(config)
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 256)
    params = perturb_params(module.init(jax.random.key(0), tokens)["params"])
    logits_of = jax.jit(lambda x: module.apply({"params": params}, x).logits)
    logits = logits_of(tokens)
    assert logits.shape == (1, 12, 259)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert not future_leaks(logits_of, tokens, 256, (1, 5, 11))


def test_ablate_plan_and_list_show_the_plain_bytes_step(capsys):
    """``--plan`` prints ``plan_table`` of the resolved grid (counts stubbed here: the real
    width search takes a minute); ``--list`` names the variant."""
    grid = ablate.GRIDS["v4-to-v5"]
    resolved = ablate.resolve_grid(grid, get_tokenizer("byte"), count=lambda f, c: 1000)
    table = ablate.plan_table(resolved, resolved[0].params).splitlines()
    rows = [r for r in table if r.startswith("| plain-bytes |")]
    assert len(rows) == 1
    assert rows[0].startswith("| plain-bytes | rms-norm | qpf:tiny-byte |")
    assert ablate.main(["--list"]) == 0
    assert "plain-bytes" in capsys.readouterr().out
