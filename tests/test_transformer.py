"""Transformer baseline: causality, gradients, KV-cache decoding, attention reference, presets."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf import config as cfgs
from qpf.models.family import resolve_model
from qpf.models.param_count import family_param_count, parameter_report
from qpf.models.transformer import (
    PRESETS,
    TRANSFORMER_FAMILY,
    CausalSelfAttention,
    Transformer,
    TransformerConfig,
    init_state,
)
from qpf.presets import get_preset


def small_config(**kw) -> TransformerConfig:
    base = dict(vocab_size=31, dim=12, num_layers=2, num_heads=3, max_len=23, dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


@functools.cache
def compiled(config: TransformerConfig):
    """Jitted (init, apply(params, inputs, state)), shared by every test of one config."""
    model = Transformer(config)
    return jax.jit(model.init), jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))


def build(config: TransformerConfig, batch: int = 2, t: int = 13, seed: int = 0):
    init, apply = compiled(config)
    tokens = jax.random.randint(jax.random.key(seed), (batch, t), 0, config.vocab_size)
    params = init(jax.random.key(seed + 1), tokens)["params"]
    return Transformer(config), params, tokens, apply


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"positions": "learned", "norm": "layernorm", "tie_embeddings": False},
    ],
)
def test_logits_at_t_ignore_tokens_after_t(kw):
    _, params, tokens, run = build(small_config(**kw))
    apply = lambda x: run(params, x, None).logits  # noqa: E731
    base = apply(tokens)
    for t in (0, 5, 11):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % 31)
        out = apply(changed)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-6, atol=1e-7)
        assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize(
    "kw",
    [
        {"dropout": 0.1},
        {"positions": "learned", "norm": "layernorm", "tie_embeddings": False, "max_len": 13},
    ],
)
def test_every_parameter_receives_gradient(kw):
    model, params, tokens, _ = build(small_config(**kw), batch=3)

    def loss(p):
        logits = model.apply(
            {"params": p}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)}
        ).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, f"parameters with zero gradient: {dead}"
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in flat)


@pytest.mark.parametrize(
    ("kw", "cuts"),
    [
        ({}, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)),  # k = 0: token by token
        ({"positions": "learned", "tie_embeddings": False}, (0, 3, *range(4, 14))),  # k = 3
        ({"norm": "layernorm"}, (0, 6, 12, 13)),  # chunked prefill, then one token
    ],
)
def test_kv_cache_decoding_equals_full_forward(kw, cuts):
    config = small_config(**kw)
    _, params, tokens, run = build(config, seed=4)
    full = run(params, tokens, None).logits
    step = lambda x, s: run(params, x, s)  # noqa: E731
    state, pieces = init_state(config, tokens.shape[0], 17), []
    for a, b in itertools.pairwise(cuts):
        out = step(tokens[:, a:b], state)
        state, pieces = out.state, [*pieces, out.logits]
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-4, atol=1e-5)
    assert int(state["pos"]) == tokens.shape[1]
    assert state["k"].shape == (2, 2, 17, 3, 4)


def test_cache_overflow_gives_nan_and_stateless_state_holds_the_input():
    config = small_config()
    _, params, tokens, run = build(config)
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
    config = small_config(positions=positions)
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


def test_bfloat16_forward_is_finite_and_close_to_float32():
    config = small_config()
    _, params, tokens, run = build(config)
    f32 = run(params, tokens, None).logits
    bf16 = jax.jit(
        lambda x: Transformer(config.replace(dtype="bfloat16")).apply({"params": params}, x)
    )(tokens)
    assert bf16.logits.dtype == jnp.bfloat16
    assert bf16.state["k"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(bf16.logits, np.float32)))
    np.testing.assert_allclose(np.asarray(bf16.logits, np.float32), f32, atol=5e-2)


@functools.cache
def qpf_count(name: str) -> int:
    return parameter_report(get_preset(name).model)["total"]


# "classic" is the Wave-Native GPT benchmark baseline (tests/test_wavegpt.py), not a qpf match.
@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"classic"}))
def test_preset_parameter_counts_match_qpf_within_ten_percent(name):
    count = family_param_count(TRANSFORMER_FAMILY, PRESETS[name].model)
    assert abs(count / qpf_count(name) - 1) < 0.10, (name, count, qpf_count(name))
    assert PRESETS[name].tokenizer == ("byte" if name.endswith("-byte") else "gpt2")


def test_registered_family_and_config_round_trip():
    family, preset = resolve_model("transformer:small")
    assert family is TRANSFORMER_FAMILY
    assert preset.model.dim == 512
    cfg = small_config(positions="learned", dtype="bfloat16")
    assert cfgs.from_dict(TransformerConfig, cfgs.to_dict(cfg)) == cfg
    assert cfgs.apply_overrides(cfg, {"num_layers": "3"}).num_layers == 3


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_heads": 5}, "num_heads"),  # 12 % 5 != 0
        ({"num_heads": 4}, "num_heads"),  # head width 3 is odd under rotary
        ({"positions": "alibi"}, "positions"),
        ({"norm": "batchnorm"}, "norm"),
        ({"dropout": 1.0}, "dropout"),
        ({"dtype": "float16"}, "dtype"),
        ({"dim": 0}, "dim"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"rope_base": 0.5}, "rope_base"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(cfgs.ConfigError, match=rf"TransformerConfig\.{field} = "):
        small_config(**kw)
