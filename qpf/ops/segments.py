"""Document segments of packed windows: where they start and positions inside them.

``segment_ids`` int ``[B, T]`` give each position's document inside a packed window
(``qpf.data`` emits them with ``DataConfig.segment_ids``; the EOS separator opens the next
document). A *reset* at position t (the id changes from t-1 to t) means that nothing from
before t reaches t: recurrences carry a zero state into t, convolutions take no tap and
attention sees no key before t. Position 0 is never a reset (it continues the carried
state, which is zero for a fresh forward). Only changes of id matter: an id that comes back
after another is a new document (``document_index`` numbers them in order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def segment_starts(segment_ids: Array) -> Array:
    """bool ``[B, T]``: True where the id differs from the previous position's (t >= 1)."""
    seg = jnp.asarray(segment_ids)
    first = jnp.zeros_like(seg[:, :1], dtype=bool)
    return jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)


def document_index(segment_ids: Array) -> Array:
    """int32 ``[B, T]``: 0 for the row's first document, +1 at every reset."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def segment_positions(segment_ids: Array) -> Array:
    """int32 ``[B, T]``: t minus the start of t's segment (the first segment starts at 0)."""
    seg = jnp.asarray(segment_ids)
    t = jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :]
    start = jax.lax.cummax(jnp.where(segment_starts(seg), t, 0), axis=1)
    return t - start


def same_segment_lagged(segment_ids: Array, lag: int) -> Array:
    """bool ``[B, T]``: whether position t - lag is in t's document (a causal tap may read it).

    Positions before 0 (a carried window) count as the first position's document.
    """
    seg = document_index(segment_ids)
    if lag == 0:
        return jnp.ones(seg.shape, bool)
    t = seg.shape[1]
    earlier = jnp.concatenate([jnp.repeat(seg[:, :1], lag, axis=1), seg], axis=1)[:, :t]
    return earlier == seg
