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
                "local": qp - window < kp <= qp,
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


def _segments(t: int) -> np.ndarray:
    """Row 0: documents starting at 0, 5 and 12; row 1: at 0 and 3 (ids 0, 1, 2 / 0, 1)."""
    pos = np.arange(t)
    return np.stack([(pos >= 5).astype(int) + (pos >= 12), (pos >= 3).astype(int)]).astype(np.int32)


@pytest.mark.parametrize("rule", ["chunked", "sliding", "local", "causal"])
@pytest.mark.parametrize("t", [4, 17])
def test_segments_give_each_document_what_it_gets_alone(rule, t):
    """Each document of a packed row equals the dense reference on that document alone."""
    window = 4 if rule != "causal" else 9  # causal: the whole row within the history span
    q, k, v = qkv(t, seed=2)
    seg = _segments(t)
    out, _ = attend(q, k, v, 0, window=window, rule=rule, segment_ids=jnp.asarray(seg))
    for r in range(2):
        for doc in np.unique(seg[r]):
            at = np.flatnonzero(seg[r] == doc)
            lo, hi = at[0], at[-1] + 1
            one = [x[r : r + 1, lo:hi] for x in (q, k, v)]
            want = numpy_reference(*one, window, rule)
            np.testing.assert_allclose(out[r : r + 1, lo:hi], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["chunked", "local"])
def test_segment_ids_all_zero_equal_none_and_the_history_joins_the_first_document(rule):
    window, t = 4, 13
    q, k, v = qkv(23, seed=3)
    zeros = jnp.zeros((2, t), jnp.int32)
    plain, hist = attend(q[:, :t], k[:, :t], v[:, :t], 0, window=window, rule=rule)
    same, _ = attend(q[:, :t], k[:, :t], v[:, :t], 0, window=window, rule=rule, segment_ids=zeros)
    np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-6)
    # A chunk after a history: its first document continues it, the second starts fresh.
    seg = jnp.asarray((np.arange(10) >= 6).astype(np.int32))[None].repeat(2, 0)
    rest = [x[:, t : t + 10] for x in (q, k, v)]
    out, _ = attend(*rest, t, window=window, rule=rule, history=hist, segment_ids=seg)
    full, _ = attend(q[:, : t + 6], k[:, : t + 6], v[:, : t + 6], 0, window=window, rule=rule)
    np.testing.assert_allclose(out[:, :6], full[:, t:], rtol=1e-5, atol=1e-6)
    alone = numpy_reference(*(x[:, 6:] for x in rest), window, rule)
    np.testing.assert_allclose(out[:, 6:], alone, rtol=1e-5, atol=1e-6)


def test_chunked_rule_window_spans_64_to_127_previous_tokens():
    q = jnp.arange(64, 256)[:, None]
    k = jnp.arange(256)[None, :]
    counts = np.asarray(visible(q, k, 64, "chunked").sum(-1))
    assert counts.min() == 64
    assert counts.max() == 127


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match="rule"):
        visible(jnp.zeros(1), jnp.zeros(1), 4, "bogus")


def test_an_id_that_comes_back_is_a_new_document():
    q, k, v = qkv(9, seed=4)
    reused = jnp.asarray([[0, 0, 0, 1, 1, 0, 0, 0, 0]] * 2, jnp.int32)
    fresh = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 2]] * 2, jnp.int32)
    for rule in ("sliding", "local"):
        a, _ = attend(q, k, v, 0, window=4, rule=rule, segment_ids=reused)
        b, _ = attend(q, k, v, 0, window=4, rule=rule, segment_ids=fresh)
        np.testing.assert_array_equal(a, b)
