"""Transformer baseline: causality, gradients, KV-cache decoding, attention reference, presets."""

from __future__ import annotations

import family_checks as checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_checks import mismatch, piecewise_logits

from qpf import config as cfgs
from qpf.models.baseline_layers import norm
from qpf.models.family import check_segment_resets
from qpf.models.transformer import (
    PRESETS,
    TRANSFORMER_FAMILY,
    CausalSelfAttention,
    init_state,
)
from qpf.zoo import resolve_model

# .config(**changes) -> config; .build(config, batch=2, t=13, seed=0) -> (module, params,
# tokens, jitted apply), compiled once per config
SMALL = checks.small_model(TRANSFORMER_FAMILY, vocab_size=31, dim=12, num_layers=2,
                           num_heads=3, max_len=23, dropout=0.0)  # fmt: skip


# Causality, gradients, decode == forward and bf16 of the default config are checked for
# every family by tests/test_families.py (preset transformer:test); here the variant
# switches (learned positions, LayerNorm, untied head) get the same checks.
VARIANT = {"positions": "learned", "norm": "layernorm", "tie_embeddings": False, "dropout": 0.1}


def test_variant_is_causal_and_trains_every_parameter_and_table_row():
    assert not (failures := SMALL.variant_failures((0, 5, 11), **VARIANT)), "\n".join(failures)


@pytest.mark.parametrize(
    ("kw", "cuts"),
    [
        ({}, tuple(range(14))),  # k = 0: token by token
        ({"positions": "learned", "tie_embeddings": False}, (0, 3, *range(4, 14))),  # k = 3
    ],
)
def test_kv_cache_decoding_equals_full_forward(kw, cuts):
    config = SMALL.config(**kw)
    _, params, tokens, run = SMALL.build(config, seed=4)
    full = run(params, tokens, None).logits
    step = lambda x, s: run(params, x, s)  # noqa: E731
    pieces, state = piecewise_logits(step, tokens, init_state(config, tokens.shape[0], 17), cuts)
    assert not (err := mismatch(pieces, full, rtol=1e-4, atol=1e-5)), err
    assert int(state["pos"]) == tokens.shape[1]
    assert state["k"].shape == (2, 2, 17, 3, 4)


def test_cache_overflow_gives_nan_and_stateless_state_holds_the_input():
    config = SMALL.config()
    _, params, tokens, run = SMALL.build(config)
    out = run(params, tokens, None)
    assert int(out.state["pos"]) == 13
    assert out.state["k"].shape == (2, 2, 13, 3, 4)
    state = init_state(config, 2, 17)
    nearly_full = run(params, tokens[:, :1], {**state, "pos": jnp.int32(16)})
    assert np.all(np.isfinite(nearly_full.logits))
    assert np.all(np.isnan(run(params, tokens[:, :1], nearly_full.state).logits))  # 18 > 17
    with pytest.raises(ValueError, match="cache length"):
        run(params, jnp.zeros((2, 18), jnp.int32), state)


def _numpy_rotary(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    half = x.shape[-1] // 2
    inv = base ** (-np.arange(half) * 2.0 / x.shape[-1])
    ang = positions[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_attention_matches_numpy_causal_softmax_reference(positions):
    config = SMALL.config(positions=positions)
    layer = CausalSelfAttention(config)
    t = 11
    x = jax.random.normal(jax.random.key(0), (2, t, 12))
    pos = jnp.arange(t, dtype=jnp.int32) + 3  # absolute positions need not start at 0
    params = jax.jit(layer.init)(jax.random.key(1), x, pos)["params"]
    y, _ = jax.jit(lambda x: layer.apply({"params": params}, x, pos))(x)

    xn = np.asarray(x, np.float64)
    w = np.asarray(params["qkv"]["kernel"], np.float64)  # [d, 3, H, Dh]
    qkv = np.einsum("btd,dkhe->btkhe", xn, w)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if positions == "rotary":
        q = _numpy_rotary(q, np.asarray(pos, np.float64), config.rope_base)
        k = _numpy_rotary(k, np.asarray(pos, np.float64), config.rope_base)
    scores = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(config.head_dim)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshe->bthe", p, v)
    ref = np.einsum("bthe,hed->btd", o, np.asarray(params["out"]["kernel"], np.float64))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6)


def test_spec_presets_match_qpf_parameter_counts_within_ten_percent():
    failures = checks.preset_count_failures(
        TRANSFORMER_FAMILY, {k: v for k, v in PRESETS.items() if k != "classic"}
    )  # not "test"; "classic" is the Wave-Native GPT benchmark's baseline
    assert not failures, "\n".join(failures)


def test_registered_family_and_config_round_trip():
    assert resolve_model("transformer:small") == (TRANSFORMER_FAMILY, PRESETS["small"])
    assert PRESETS["small"].model.dim == 512
    failures = SMALL.round_trip_failures(positions="learned", dtype="bfloat16")
    assert not failures, failures
    assert cfgs.apply_overrides(SMALL.config(), {"num_layers": "3"}).num_layers == 3


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_heads": 5}, "num_heads"),  # 12 % 5 != 0
        ({"num_heads": 4}, "num_heads"),  # head width 3 is odd under rotary
        ({"positions": "alibi"}, "positions"),
        ({"norm": "batchnorm"}, "norm"),
        ({"dropout": 1.0}, "dropout"),
        ({"dim": 0}, "dim"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"rope_base": 0.5}, "rope_base"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(cfgs.ConfigError, match=rf"TransformerConfig\.{field} = "):
        SMALL.config(**kw)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norms_match_the_formulas_in_float32_and_keep_the_compute_dtype(kind):
    x = jax.random.normal(jax.random.key(0), (3, 12)) * 3.0 + 1.0
    xn = np.asarray(x, np.float64)
    if kind == "rmsnorm":
        ref = xn / np.sqrt(np.mean(xn**2, -1, keepdims=True) + 1e-6)
    else:
        centred = xn - xn.mean(-1, keepdims=True)
        ref = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + 1e-6)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        layer = norm(SMALL.config(norm=kind, dtype=dtype), name="n")
        params = layer.init(jax.random.key(1), x)["params"]
        assert set(params) == ({"scale"} if kind == "rmsnorm" else {"scale", "bias"})
        y = layer.apply({"params": params}, x.astype(dtype))
        assert y.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol)


def test_learned_positions_restart_per_document_and_cudnn_is_refused():
    """Packed documents (row 0 splits at 4, row 1 at 9) with a learned position table: each
    document's logits equal those of it alone (positions from 0, attention inside it)."""
    config = SMALL.config(**VARIANT)
    module, params, tokens, run = SMALL.build(config, seed=5)
    params = checks.perturb_params(params)
    seg = (jnp.arange(13)[None, :] >= jnp.array([[4], [9]])).astype(jnp.int32)
    packed = jax.jit(lambda p, x, g: module.apply({"params": p}, x, segment_ids=g).logits)(
        params, tokens, seg
    )
    for row, split in ((0, 4), (1, 9)):
        first = run(params, tokens[row : row + 1, :split], None).logits
        second = run(params, tokens[row : row + 1, split:], None).logits
        assert not (err := mismatch(packed[row : row + 1, :split], first, 1e-4, 1e-5)), err
        assert not (err := mismatch(packed[row : row + 1, split:], second, 1e-4, 1e-5)), err
    with pytest.raises(cfgs.ConfigError, match="attention_impl='xla'"):
        check_segment_resets(TRANSFORMER_FAMILY, SMALL.config(attention_impl="cudnn"))
