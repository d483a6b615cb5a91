"""Top-k cosine retrieval over a large slot table, without the full score matrix.

Selection (which k slots) is not differentiable, so it runs under ``stop_gradient`` as a
running top-k over key chunks: only a ``[N, k + chunk]`` block exists at a time, in the
forward and the backward pass. The k selected scores are then recomputed from the gathered
keys, so gradients reach the query and exactly the selected keys and values, as in the
original (spec §9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qpf.ops import phase2d as p2d

Array = jax.Array


def _norms(x: Array) -> Array:
    """L2 norm with the 1e-8 inside the root over the last axis. ``[..., D]`` -> ``[...]``."""
    return jnp.sqrt(jnp.sum(x * x, axis=-1) + p2d.MODULUS_EPS)


def cosine_scores(q: Array, keys: Array) -> Array:
    """q·K_m / (‖q‖‖K_m‖ + 1e-8): q ``[N, D]``, keys ``[S, D]`` -> ``[N, S]``."""
    return (q @ keys.T) / (_norms(q)[:, None] * _norms(keys)[None, :] + p2d.COHERENCE_EPS)


def topk_indices(q: Array, keys: Array, k: int, chunk_size: int) -> Array:
    """Indices of the k best cosine scores per query, in descending order.

    Keys are visited in chunks of ``chunk_size`` with a running top-k, so memory is
    O(N·(k + chunk_size)) however many slots there are. q ``[N, D]``, keys ``[M, D]`` ->
    int32 ``[N, k]`` with k <= M.
    """
    q, keys = jax.lax.stop_gradient(q), jax.lax.stop_gradient(keys)
    m = keys.shape[0]
    if m <= chunk_size:
        return jax.lax.top_k(cosine_scores(q, keys), k)[1]
    pad = (-m) % chunk_size
    blocks = jnp.pad(keys, ((0, pad), (0, 0))).reshape(-1, chunk_size, keys.shape[-1])
    offsets = jnp.arange(blocks.shape[0], dtype=jnp.int32) * chunk_size

    def visit(carry, block_and_offset):
        best_s, best_i = carry
        block, offset = block_and_offset
        ids = offset + jnp.arange(chunk_size, dtype=jnp.int32)
        s = jnp.where(ids < m, cosine_scores(q, block), -jnp.inf)
        merged_s = jnp.concatenate([best_s, s], axis=-1)
        merged_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, s.shape)], axis=-1)
        top_s, pos = jax.lax.top_k(merged_s, k)
        return (top_s, jnp.take_along_axis(merged_i, pos, axis=-1)), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype), jnp.zeros((q.shape[0], k), jnp.int32))
    (_, best_i), _ = jax.lax.scan(visit, init, (blocks, offsets))
    return best_i


def topk_read(
    q: Array, keys: Array, values: Array, k: int, chunk_size: int
) -> tuple[Array, Array, Array]:
    """Soft read of the top-k slots: softmax over their cosine scores, weighted value sum.

    q ``[N, D]``, keys/values ``[M, D]`` -> (retrieved ``[N, D]``, weights ``[N, k]``,
    indices ``[N, k]``), k clipped to M. Scores and softmax in q's dtype (use float32).
    """
    k = min(k, keys.shape[0])
    idx = topk_indices(q, keys, k, chunk_size)
    sel_k = jnp.take(keys, idx, axis=0)  # [N, k, D]
    scores = jnp.einsum("nd,nkd->nk", q, sel_k) / (
        _norms(q)[:, None] * _norms(sel_k) + p2d.COHERENCE_EPS
    )
    weights = jax.nn.softmax(scores, axis=-1)
    retrieved = jnp.einsum("nk,nkd->nd", weights, jnp.take(values, idx, axis=0).astype(q.dtype))
    return retrieved, weights, idx
