"""Chunked top-k cosine retrieval against the dense computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.ops import retrieval


def data(n=13, m=37, d=6, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k[0], (n, d)),
        jax.random.normal(k[1], (m, d)),
        jax.random.normal(k[2], (m, d)),
    )


def dense_read(q, keys, values, k):
    q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
    s = (
        q
        @ keys.T
        / (np.sqrt((q**2).sum(-1) + 1e-8)[:, None] * np.sqrt((keys**2).sum(-1) + 1e-8) + 1e-8)
    )
    idx = np.argsort(-s, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(s, idx, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("nk,nkd->nd", w, values[idx]), w, idx


@pytest.mark.parametrize("chunk", [5, 8, 37, 64])
def test_chunked_topk_read_matches_dense(chunk):
    q, keys, values = data()
    got, w, idx = retrieval.topk_read(q, keys, values, 7, chunk)
    want, want_w, want_idx = dense_read(q, keys, values, 7)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(w, want_w, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_k_larger_than_slots_is_clipped():
    q, keys, values = data(m=4)
    got, _w, idx = retrieval.topk_read(q, keys, values, 32, 2)
    assert idx.shape == (13, 4)
    np.testing.assert_allclose(got, dense_read(q, keys, values, 4)[0], rtol=1e-5, atol=1e-6)


def test_gradient_reaches_only_selected_keys_and_values():
    q, keys, values = data(n=2, m=41)
    _, _, idx = retrieval.topk_read(q, keys, values, 3, 8)
    gk, gv = jax.grad(lambda k, v: jnp.sum(retrieval.topk_read(q, k, v, 3, 8)[0] ** 2), (0, 1))(
        keys, values
    )
    chosen = np.zeros(41, bool)
    chosen[np.asarray(idx).ravel()] = True
    assert np.all(np.abs(np.asarray(gk))[~chosen] == 0)
    assert np.all(np.abs(np.asarray(gv))[~chosen] == 0)
    assert np.all(np.abs(np.asarray(gv))[chosen].sum(-1) > 0)
    assert np.all(np.abs(np.asarray(gk))[chosen].sum(-1) > 0)


def test_chunked_selection_never_builds_the_full_score_matrix():
    """With more slots than the chunk, no intermediate has a [N, M] shape."""
    q, keys, values = data(n=3, m=50)
    jaxpr = jax.make_jaxpr(lambda q, k, v: retrieval.topk_read(q, k, v, 4, 8))(q, keys, values)
    shapes = [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars]
    for e in jaxpr.jaxpr.eqns:
        for sub in e.params.values():
            if hasattr(sub, "jaxpr"):
                shapes += [tuple(v.aval.shape) for se in sub.jaxpr.eqns for v in se.outvars]
    assert (3, 50) not in shapes
    assert (3, 56) not in shapes
