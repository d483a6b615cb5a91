"""Windowed causal attention against a dense numpy reference, with and without history."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.ops.attention import visible, windowed_attention

attend = jax.jit(windowed_attention, static_argnames=("window", "rule"))


def numpy_reference(q, k, v, window, rule, start=0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, d = q.shape[1], q.shape[2]
    out = np.zeros_like(q)
    for i in range(t):
        qp = start + i
        keys = []
        for j in range(t):
            kp = start + j
            ok = {
                "chunked": kp < qp and kp >= window * (qp // window - 1),
                "sliding": qp - window <= kp < qp,
                "causal": kp <= qp,
            }[rule] and kp >= 0
            if ok:
                keys.append(j)
        if keys:
            s = np.einsum("bd,bkd->bk", q[:, i], k[:, keys]) / np.sqrt(d)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, i] = np.einsum("bk,bkd->bd", w, v[:, keys])
    return out


def qkv(t, d=6, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (2, t, d)) for kk in k)


# The causal rule is the original's short path, defined only for T <= 2*window (8 here).
CASES = [(r, t) for r in ("chunked", "sliding", "causal") for t in (1, 3, 4, 9, 17)]


@pytest.mark.parametrize(("rule", "t"), [(r, t) for r, t in CASES if r != "causal" or t <= 8])
def test_matches_dense_reference(rule, t):
    window = 4
    q, k, v = qkv(t)
    out, _ = attend(q, k, v, 0, window=window, rule=rule)
    np.testing.assert_allclose(out, numpy_reference(q, k, v, window, rule), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["chunked", "sliding"])
def test_streaming_with_history_equals_one_pass(rule):
    window = 4
    q, k, v = qkv(23, seed=1)
    full, _ = attend(q, k, v, 0, window=window, rule=rule)
    history, pieces, pos = None, [], 0
    for n in (1, 2, 5, 1, 9, 5):  # chunks shorter and longer than the window
        out, history = attend(
            q[:, pos : pos + n],
            k[:, pos : pos + n],
            v[:, pos : pos + n],
            pos,
            window=window,
            rule=rule,
            history=history,
        )
        pieces.append(out)
        pos += n
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-6)


def test_chunked_rule_window_spans_64_to_127_previous_tokens():
    q = jnp.arange(64, 256)[:, None]
    k = jnp.arange(256)[None, :]
    counts = np.asarray(visible(q, k, 64, "chunked").sum(-1))
    assert counts.min() == 64
    assert counts.max() == 127


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match="rule"):
        visible(jnp.zeros(1), jnp.zeros(1), 4, "bogus")
