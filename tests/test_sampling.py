"""Sampling: greedy, filters never emit removed tokens, repetition penalty, per-row keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.config import ConfigError
from qpf.ops.sampling import (
    TOP_P_CANDIDATES,
    SamplingConfig,
    apply_repetition_penalty,
    distribution,
    filter_logits,
    presence_from_tokens,
    row_keys,
    sample,
    sample_reference,
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


# --------------------------------------------------------------- fast vs reference

FAST_CONFIGS = [
    SamplingConfig(top_k=5),
    SamplingConfig(top_p=0.7),
    SamplingConfig(min_p=0.1),
    SamplingConfig(temperature=0.7, top_k=9, top_p=0.8, min_p=0.05),
    SamplingConfig(temperature=1.3, top_k=50, top_p=0.9),  # k > V: every token a candidate
    SamplingConfig(temperature=0.9, top_k=6, repetition_penalty=1.5),
    SamplingConfig(temperature=1.0),
]


def _presence():
    return presence_from_tokens(
        jnp.array([[0, 3, 7], [1, 1, 2], [5, 6, 8], [9, 9, 9], [4, 2, 0]]), V
    )


@pytest.mark.parametrize("config", FAST_CONFIGS)
def test_fast_sampler_distribution_is_exactly_the_reference(config):
    x, seen = logits(), _presence()
    got = jax.jit(lambda x: distribution(x, config, seen))(x)
    penalised = (
        x
        if config.repetition_penalty == 1
        else apply_repetition_penalty(x, seen, config.repetition_penalty)
    )
    want = jax.nn.softmax(filter_logits(penalised, config), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", FAST_CONFIGS)
def test_fast_sampler_draws_the_reference_tokens_for_fixed_keys(config):
    x, seen = logits(), _presence()

    @jax.jit
    def both(x):
        keys = jax.vmap(lambda s: row_keys(jax.random.key(3), s, x.shape[0]))(jnp.arange(200))
        fast = jax.vmap(lambda k: sample(x, k, config, seen))(keys)
        ref = jax.vmap(lambda k: sample_reference(x, k, config, seen))(keys)
        return fast, ref

    fast, ref = both(x)
    np.testing.assert_array_equal(fast, ref)
    # And the draws follow the distribution (200 draws per row; 5 sigma, and a rare token
    # drawn once or twice is no failure).
    probs = np.asarray(distribution(x, config, seen))
    for b in range(x.shape[0]):
        freq = np.bincount(np.asarray(fast)[:, b], minlength=V) / 200
        assert np.all(
            np.abs(freq - probs[b]) <= 5 * np.sqrt(probs[b] * (1 - probs[b]) / 200) + 2 / 200
        )


@pytest.mark.parametrize("scale", [4.0, 0.01])
def test_top_p_without_top_k_on_a_large_vocabulary_both_branches(scale):
    # Peaked logits: the first TOP_P_CANDIDATES hold the mass (no sort); flat logits: they
    # do not and the row is sorted. Either way the tokens are the reference's.
    vocab = TOP_P_CANDIDATES * 3 + 7
    x = scale * jax.random.normal(jax.random.key(5), (2, vocab))
    config = SamplingConfig(top_p=0.95)
    mass = jnp.sort(jax.nn.softmax(x, -1), -1)[:, ::-1][:, :TOP_P_CANDIDATES].sum(-1)
    assert bool(jnp.all(mass >= 0.95)) == (scale > 1)

    @jax.jit
    def both(x):
        keys = jax.vmap(lambda s: row_keys(jax.random.key(4), s, 2))(jnp.arange(20))
        fast = jax.vmap(lambda k: sample(x, k, config))(keys)
        return fast, jax.vmap(lambda k: sample_reference(x, k, config))(keys)

    fast, ref = both(x)
    np.testing.assert_array_equal(fast, ref)
