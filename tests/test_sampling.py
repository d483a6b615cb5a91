"""Sampling: greedy, filters never emit removed tokens, repetition penalty, per-row keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.config import ConfigError
from qpf.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    presence_from_tokens,
    row_keys,
    sample,
)

V = 37


def logits(batch=5, seed=0):
    return 2.0 * jax.random.normal(jax.random.key(seed), (batch, V))


def draws(x, config, n=400, presence=None):
    """n independent draws per row ``[n, B]`` in one compiled call."""

    @jax.jit
    def run(x, presence):
        keys = jax.vmap(lambda s: row_keys(jax.random.key(1), s, x.shape[0]))(jnp.arange(n))
        return jax.vmap(lambda k: sample(x, k, config, presence))(keys)

    return np.asarray(run(x, presence))


def test_greedy_is_argmax():
    x = logits()
    got = jax.jit(lambda x: sample(x, row_keys(jax.random.key(0), 0, 5), SamplingConfig(0.0)))(x)
    np.testing.assert_array_equal(got, np.argmax(x, -1))


def test_filters_never_emit_removed_tokens():
    x = logits()
    probs = np.asarray(jax.nn.softmax(x, -1))
    order = np.argsort(-probs, -1)
    for config in (
        SamplingConfig(top_k=4),
        SamplingConfig(top_p=0.6),
        SamplingConfig(min_p=0.2),
        SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05),
    ):
        got = draws(x, config)
        for b in range(x.shape[0]):
            allowed = np.ones(V, bool)
            if config.top_k:
                allowed &= np.isin(np.arange(V), order[b, : config.top_k])
            p = np.asarray(jax.nn.softmax(x[b] / config.temperature))
            if config.top_p < 1:
                pk = np.where(allowed, p, 0) / np.where(allowed, p, 0).sum()
                srt = order[b]
                before = np.cumsum(pk[srt]) - pk[srt]
                allowed &= np.isin(np.arange(V), srt[before < config.top_p])
            if config.min_p:
                pk = np.where(allowed, p, 0)
                allowed &= pk >= config.min_p * pk.max()
            assert allowed[got[:, b]].all(), (config, b)
            if allowed.sum() > 1:
                assert len(set(got[:, b])) > 1  # really sampling


def test_repetition_penalty_handles_negative_logits():
    x = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(
        apply_repetition_penalty(x, seen, 2.0), [[1.0, -4.0, 1.0, -1.0]], rtol=0
    )
    presence = presence_from_tokens(jnp.array([[0, 1, 1]]), 4)
    np.testing.assert_array_equal(presence, seen)
    # A strong penalty moves greedy off the repeated best token.
    got = sample(
        x, row_keys(jax.random.key(0), 0, 1), SamplingConfig(0.0, repetition_penalty=3.0), seen
    )
    assert int(got[0]) == 2


def test_same_seed_same_tokens_and_rows_are_independent_of_batch():
    x = jnp.tile(logits(1), (4, 1))
    config = SamplingConfig(temperature=1.0)
    a, b = draws(x, config, n=50), draws(x, config, n=50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, 0], a[:, 1])  # identical rows, different streams
    np.testing.assert_array_equal(draws(x[:2], config, n=50), a[:, :2])  # batch size free


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
    ],
)
def test_invalid_config_names_field_and_range(field, value):
    with pytest.raises(ConfigError, match=rf"SamplingConfig\.{field} = .* allowed"):
        SamplingConfig(**{field: value})
