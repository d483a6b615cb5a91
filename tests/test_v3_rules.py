"""v3 local rules (Hebbian, STDP, EMA slot write, consolidation) against numpy references."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from qpf.ops import v3_ops as ops
from qpf.ops import v3_rules as rules


def _data(seed: int = 0, shape=(3, 7, 5), out: int = 4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(shape[-1], out)) * 0.5, rng.normal(size=shape)


def test_hebbian_matches_numpy_and_grows_under_repetition():
    w, x = _data()
    got = rules.hebbian_update(jnp.asarray(w), jnp.asarray(x))
    y = x @ w
    want = w + 0.01 * np.outer(x.mean((0, 1)), y.mean((0, 1)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    x_pos = jnp.abs(jnp.asarray(x)) + 1.0  # correlated positive activity
    w_n = jnp.abs(jnp.asarray(w))
    norms = []
    for _ in range(5):
        w_n = rules.hebbian_update(w_n, x_pos)
        norms.append(float(jnp.linalg.norm(w_n)))
    assert all(b > a for a, b in itertools.pairwise(norms))


def _numpy_stdp(w, x, lr=0.01, tau=20.0, thr=0.5, upstream=True):
    y = x @ w
    pre = (x > thr).mean(0)
    post = (y > thr).mean(0)
    d = np.exp(-1.0 / tau)
    pt, qt, dw = np.zeros(w.shape[0]), np.zeros(w.shape[1]), np.zeros_like(w)
    for t in range(x.shape[1]):
        pt = d * pt + pre[t]
        qt = d * qt + post[t]
        ltp, ltd = np.outer(pre[t], qt), np.outer(pt, post[t])
        dw += ltp - ltd if upstream else ltd - ltp
    return w + lr * dw


@pytest.mark.parametrize("upstream", [True, False])
def test_stdp_matches_numpy_loop(upstream):
    w, x = _data(1, (4, 11, 6), 5)
    got = rules.stdp_update(jnp.asarray(w), jnp.asarray(x), upstream_pairing=upstream)
    np.testing.assert_allclose(got, _numpy_stdp(w, x, upstream=upstream), rtol=1e-5, atol=1e-7)


def test_stdp_same_step_coincidences_cancel():
    # One step, pre and post both spike: upstream LTP and LTD terms are equal.
    w = jnp.eye(3)
    x = jnp.ones((2, 1, 3))
    np.testing.assert_allclose(rules.stdp_update(w, x), w, atol=0)


def test_stm_ema_slot_write_matches_per_slot_loop():
    rng = np.random.default_rng(2)
    slots, g, x = rng.normal(size=(6, 4)), rng.uniform(size=(2, 5, 6)), rng.normal(size=(2, 5, 4))
    want = slots.copy()
    for j in range(6):  # the original loops over slots one by one
        want[j] = 0.95 * want[j] + 0.05 * g[..., j].mean() * x.mean((0, 1))
    got = rules.stm_ema(jnp.asarray(slots), jnp.asarray(g), jnp.asarray(x), jnp.asarray(0.95))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rules.ema_update(jnp.ones(2), jnp.zeros(2), 0.99), 0.99)


def test_consolidation_fills_the_least_used_slot():
    rng = np.random.default_rng(3)
    gate = {"kernel": jnp.asarray(rng.normal(size=(4, 1))), "bias": jnp.asarray([0.1])}
    x, imp = rng.normal(size=(2, 3, 4)), rng.uniform(size=(2, 3))
    table, weights = jnp.zeros((5, 4)), jnp.array([1.0, 1.0, 0.0, 1.0, 0.0])
    new, w = ops.consolidate(gate, jnp.asarray(x), jnp.asarray(imp), table, weights)
    g = 1 / (1 + np.exp(-(x @ np.asarray(gate["kernel"]) + 0.1)))
    np.testing.assert_allclose(new[2], (x * g * imp[..., None]).mean((0, 1)), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(w, [1, 1, 1, 1, 0])
    assert not np.any(np.asarray(new)[[0, 1, 3, 4]])
