"""Windowed causal attention in O(T·W), with a carried key/value history for streaming.

Every query attends only to keys within ``2·window`` positions before it, so queries are
processed in blocks of ``window`` against a static key window of three blocks (the two
before and their own). The same function serves training (no history: positions before 0
are masked) and streaming/decoding (the last ``2·window`` keys and values are carried), so
the two agree exactly. Which keys a query may see is a rule on absolute positions:

* ``chunked``: k in [window·(q//window - 1), q) — the original v4 rule for T > 128.
* ``sliding``: k in [q - window, q).
* ``local``:   k in (q - window, q] (self included): the hybrid backbone's local attention.
* ``causal``:  k in [0, q] (self included): the original's rule for T <= 128, only valid
  when the whole sequence fits in the history span (T <= 2·window).

Rows with no visible key return 0. Scores and softmax run in float32.

Document resets (``segment_ids`` ``[B, T]``, see ``qpf.ops.segments``): a query sees only
keys of its own document, and the rule reads positions counted from the document's start
(the first document continues ``start`` and the history), so every rule, the aligned
``chunked`` one included, gives a packed document what it would get alone from position 0.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from qpf.ops import phase2d as p2d
from qpf.ops.segments import document_index, segment_positions

Array = jax.Array
Rule = Literal["chunked", "sliding", "causal", "local"]


def visible(q_pos: Array, k_pos: Array, window: int, rule: Rule) -> Array:
    """Boolean mask of keys visible to queries, broadcasting q_pos against k_pos."""
    if rule == "chunked":
        ok = (k_pos < q_pos) & (k_pos >= window * (q_pos // window - 1))
    elif rule == "sliding":
        ok = (k_pos < q_pos) & (k_pos >= q_pos - window)
    elif rule == "local":
        ok = (k_pos <= q_pos) & (k_pos > q_pos - window)
    elif rule == "causal":
        ok = k_pos <= q_pos
    else:
        raise ValueError(f"unknown attention rule {rule!r}; use chunked, sliding, causal or local")
    return ok & (k_pos >= 0)


def _masked_attend(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """softmax(q k^T·scale) v over visible keys; fully masked rows give 0.

    q ``[..., Q, D]``, k/v ``[..., K, D]``, mask ``[..., Q, K]`` -> ``[..., Q, D]``.
    """
    acc = p2d.acc_dtype(q.dtype)
    s = jnp.einsum("...qd,...kd->...qk", q.astype(acc), k.astype(acc)) * scale
    m = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("...qk,...kd->...qd", p, v.astype(acc)) / jnp.where(den > 0, den, 1.0)
    return out.astype(q.dtype)


def windowed_attention(
    q: Array,
    k: Array,
    v: Array,
    start: Array | int,
    *,
    window: int,
    rule: Rule,
    history: tuple[Array, Array] | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """Single-head windowed causal attention with scale 1/sqrt(D).

    Args:
      q, k, v: ``[B, T, D]`` for positions start .. start+T-1.
      start: absolute position of the first query (int or traced int32 scalar).
      window: the window W; the history spans H = 2W positions.
      rule: 'chunked', 'sliding', 'causal' or 'local' (see module docstring).
      history: (keys, values) ``[B, H, D]`` of positions start-H .. start-1 (entries at
        negative positions are ignored); zeros if None.
      segment_ids: int ``[B, T]`` documents of the chunk, or None (one document). The
        history belongs to the chunk's first document.

    Returns:
      (out ``[B, T, D]``, new history: the last H keys and values).
    """
    b, t, dim = q.shape
    span = 2 * window
    if history is None:
        history = (jnp.zeros((b, span, dim), k.dtype), jnp.zeros((b, span, dim), v.dtype))
    kk = jnp.concatenate([history[0].astype(k.dtype), k], axis=1)  # [B, H+T, D]
    vv = jnp.concatenate([history[1].astype(v.dtype), v], axis=1)
    scale = 1.0 / float(dim) ** 0.5
    if segment_ids is not None:
        out = _segmented(q, kk, vv, start, segment_ids, window, rule, scale)
        return out, (kk[:, -span:], vv[:, -span:])
    q_pos = start + jnp.arange(t, dtype=jnp.int32)
    k_pos = start - span + jnp.arange(span + t, dtype=jnp.int32)
    if t <= window:  # short chunks (decoding): attend to the whole (history + chunk) directly
        mask = visible(q_pos[:, None], k_pos[None, :], window, rule)
        out = _masked_attend(q, kk, vv, mask, scale)
    else:
        out = _blocked(q, kk, vv, q_pos, k_pos, window, rule, scale)
    return out, (kk[:, -span:], vv[:, -span:])


def _blocked(q, kk, vv, q_pos, k_pos, window, rule, scale) -> Array:
    """Queries in blocks of W, each against its 3W-key window (two blocks back + own)."""
    b, t, dim = q.shape
    pad = (-t) % window
    nb = (t + pad) // window
    # Padded keys sit after every real query, so every rule masks them.
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(b, nb, window, dim)
    kk = jnp.pad(kk, ((0, 0), (0, pad), (0, 0))).reshape(b, nb + 2, window, dim)
    vv = jnp.pad(vv, ((0, 0), (0, pad), (0, 0))).reshape(b, nb + 2, window, dim)
    q_pos = (q_pos[0] + jnp.arange(nb * window, dtype=jnp.int32)).reshape(nb, window)
    k_pos = (k_pos[0] + jnp.arange((nb + 2) * window, dtype=jnp.int32)).reshape(nb + 2, window)

    def three_block_window(x: Array, ax: int) -> Array:
        """Per query block i, key blocks i, i+1, i+2 of the padded keys, joined on ``ax + 1``."""
        blocks = [jax.lax.slice_in_dim(x, i, i + nb, axis=ax) for i in range(3)]
        return jnp.concatenate(blocks, axis=ax + 1)

    kw, vw = three_block_window(kk, 1), three_block_window(vv, 1)  # [B, nb, 3W, D]
    kpw = three_block_window(k_pos, 0)  # [nb, 3W]
    mask = visible(q_pos[:, :, None], kpw[:, None, :], window, rule)  # [nb, W, 3W]
    out = _masked_attend(q, kw, vw, mask, scale)
    return out.reshape(b, nb * window, dim)[:, :t]


def _segmented(q, kk, vv, start, segment_ids, window, rule, scale) -> Array:
    """``windowed_attention`` with documents: per-row positions counted from each
    document's start, and keys of other documents masked. q ``[B, T, D]``, kk/vv
    ``[B, H + T, D]`` (history first) -> ``[B, T, D]``."""
    b, t, dim = q.shape
    span = 2 * window
    seg = document_index(segment_ids)  # [B, T]: an id that comes back is a new document
    q_pos = start + segment_positions(seg)  # [B, T]
    hist = jnp.broadcast_to(start - span + jnp.arange(span, dtype=jnp.int32), (b, span))
    k_pos = jnp.concatenate([hist, q_pos], axis=1)  # [B, H + T]
    k_seg = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (b, span)), seg], axis=1)
    if t <= window:
        mask = visible(q_pos[:, :, None], k_pos[:, None, :], window, rule)
        mask = mask & (seg[:, :, None] == k_seg[:, None, :])
        return _masked_attend(q, kk, vv, mask, scale)
    pad = (-t) % window
    nb = (t + pad) // window
    k_ok = jnp.pad(jnp.ones((b, span + t), bool), ((0, 0), (0, pad)))  # padded keys: never

    def blocks(x: Array, n: int) -> Array:  # [B, n·W, ...] (padded) -> [B, n, W, ...]
        x = jnp.pad(x, ((0, 0), (0, n * window - x.shape[1]), *((0, 0),) * (x.ndim - 2)))
        return x.reshape(b, n, window, *x.shape[2:])

    def three(x: Array) -> Array:  # [B, nb + 2, W, ...] -> [B, nb, 3W, ...]
        parts = [jax.lax.slice_in_dim(x, i, i + nb, axis=1) for i in range(3)]
        return jnp.concatenate(parts, axis=2)

    kw, vw = three(blocks(kk, nb + 2)), three(blocks(vv, nb + 2))  # [B, nb, 3W, D]
    kp, ks, ko = (three(blocks(x, nb + 2)) for x in (k_pos, k_seg, k_ok))  # [B, nb, 3W]
    qp, qs = blocks(q_pos, nb), blocks(seg, nb)  # [B, nb, W]
    mask = visible(qp[..., None], kp[:, :, None, :], window, rule)  # [B, nb, W, 3W]
    mask = mask & (qs[..., None] == ks[:, :, None, :]) & ko[:, :, None, :]
    out = _masked_attend(blocks(q, nb), kw, vw, mask, scale)
    return out.reshape(b, nb * window, dim)[:, :t]
