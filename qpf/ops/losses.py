"""Training objectives as pure functions (spec §14), token-weighted and NaN-free.

Each function returns float32 (float64 under x64) scalars. Differences from the original,
all deliberate: the CE of an empty batch is 0 (the original returned NaN), and the coherence
and energy objectives can be restricted to real (non-padding) positions with ``mask``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from qpf.ops import phase2d as p2d

Array = jax.Array


def token_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Summed CE over masked positions and the number of counted tokens.

    logits ``[..., V]``, targets/mask ``[...]`` -> (sum, count). Log-softmax in float32;
    the sum/count pair lets callers weight by tokens across batches and devices.
    """
    logp = jax.nn.log_softmax(logits.astype(p2d.acc_dtype(logits.dtype)), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(nll.dtype)
    return jnp.sum(nll * mask), jnp.sum(mask)


# ------------------------------------------------------------------ LM head + CE

# Logits per chunk of the fused head when no chunk size is given: a [chunk, V] float32 block
# of 4M logits (16 MiB) stays near the CPU's caches. Measured on the 2-core CPU, head + CE
# with its gradients over 2,040 positions, F=128, V=50257: chunks of 48/64/80/96/128/256
# positions took 551/477/424/408/528/619 ms against 408 ms for its three matmuls alone;
# at V=259 (bytes), 8,192 positions: 512/2048/8192 positions took 12/10/16 ms.
HEAD_CHUNK_LOGITS = 1 << 22
HEAD_CHUNK_MAX = 2048


def auto_head_chunk(vocab: int) -> int:
    """Positions per chunk for a ``vocab``-way head: about ``HEAD_CHUNK_LOGITS`` logits,
    a multiple of 8, between 8 and ``HEAD_CHUNK_MAX``."""
    return max(8, min(HEAD_CHUNK_MAX, HEAD_CHUNK_LOGITS // max(1, vocab) // 8 * 8))


def head_logits(features: Array, weight: Array, dtype: jnp.dtype | None = None) -> Array:
    """The LM head as a matmul: features ``[..., F]`` @ weight ``[F, V]`` -> ``[..., V]``.

    Both operands are cast to ``dtype`` (default: the features' dtype) and the result is in
    that dtype, exactly as ``flax.linen.Dense(use_bias=False, dtype=dtype)``, so a model
    that returns features gives the same logits through this function as through its head.
    """
    dtype = features.dtype if dtype is None else dtype
    return jnp.dot(features.astype(dtype), weight.astype(dtype))


def head_cross_entropy_reference(
    features: Array, weight: Array, targets: Array, mask: Array, dtype: jnp.dtype | None = None
) -> tuple[Array, Array]:
    """``token_cross_entropy(head_logits(features, weight), ...)``: the plain path that
    materialises every logit. features ``[..., F]``, weight ``[F, V]``, targets/mask ``[...]``."""
    return token_cross_entropy(head_logits(features, weight, dtype), targets, mask)


def _chunked(x: Array, n: int, chunk: int) -> Array:
    """``[N, ...]`` -> ``[ceil(N/chunk), chunk, ...]`` (zero-padded at the end)."""
    pad = -n % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk, *x.shape[1:])


def _chunk_logits(x: Array, w: Array, acc: jnp.dtype) -> Array:
    """One chunk's logits ``[chunk, V]`` with ``acc`` (>= float32) accumulation."""
    return jax.lax.dot(x, w, preferred_element_type=acc)


def _nll(logits: Array, t: Array, m: Array) -> tuple[Array, Array]:
    """Masked NLL per position ``[n]`` and the logsumexp ``[n, 1]`` of logits ``[n, V]``."""
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)
    return jnp.where(m, (lse - tgt)[:, 0], 0.0), lse


def _prepare(features, weight, targets, mask, chunk, dtype):
    f = features.shape[-1]
    x = features.reshape(-1, f)
    n = x.shape[0]
    chunk = max(1, min(chunk, n))
    t = jnp.clip(targets.reshape(-1).astype(jnp.int32), 0, weight.shape[-1] - 1)
    m = mask.reshape(-1).astype(bool)
    xs = (_chunked(x.astype(dtype), n, chunk), _chunked(t, n, chunk), _chunked(m, n, chunk))
    return xs, weight.astype(dtype), n


def _fused_forward(features, weight, targets, mask, chunk, dtype):
    dtype = jnp.dtype(dtype or features.dtype)
    acc = jnp.promote_types(dtype, jnp.float32)
    xs, w, _ = _prepare(features, weight, targets, mask, chunk, dtype)

    def body(total, c):
        x, t, m = c
        nll, _ = _nll(_chunk_logits(x, w, acc), t, m)
        return total + jnp.sum(nll), None

    total, _ = jax.lax.scan(body, jnp.zeros((), acc), xs)
    return total, jnp.sum(mask.astype(acc))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(features, weight, targets, mask, chunk, dtype):
    return _fused_forward(features, weight, targets, mask, chunk, dtype)


def _fused_fwd(features, weight, targets, mask, chunk, dtype):
    # The loss is a scalar, so its gradient is the cotangent times d(loss)/d(inputs): the
    # forward computes both in one pass over each chunk's logits (three matmuls in all,
    # as the plain path) and the backward only scales them.
    dtype = jnp.dtype(dtype or features.dtype)
    acc = jnp.promote_types(dtype, jnp.float32)
    xs, w, n = _prepare(features, weight, targets, mask, chunk, dtype)

    def body(carry, c):
        total, dw = carry
        x, t, m = c
        logits = _chunk_logits(x, w, acc)
        # One exp pass serves both the loss and its gradient (exp over [chunk, V] costs
        # about as much as a head matmul on CPU): p = exp(logits - max), lse = max + log sum p.
        top = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - top)
        total_p = jnp.sum(p, axis=-1, keepdims=True)
        lse = top + jnp.log(total_p)
        tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)
        nll = jnp.where(m, (lse - tgt)[:, 0], 0.0)
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        dlogits = p * (1.0 / total_p) - (vocab == t[:, None]).astype(acc)
        dlogits = jnp.where(m[:, None], dlogits, 0.0).astype(dtype)
        dx = jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
        dw = dw + jax.lax.dot_general(
            x, dlogits, (((0,), (0,)), ((), ())), preferred_element_type=acc
        )
        return (total + jnp.sum(nll), dw), dx

    init = (jnp.zeros((), acc), jnp.zeros(w.shape, acc))
    (total, dw), dx = jax.lax.scan(body, init, xs)
    dx = dx.reshape(-1, dx.shape[-1])[:n].reshape(features.shape)
    out = (total, jnp.sum(mask.astype(acc)))
    return out, (dx.astype(features.dtype), dw.astype(weight.dtype))


def _fused_bwd(chunk, dtype, res, g):
    dx, dw = res
    return ((g[0] * dx).astype(dx.dtype), (g[0] * dw).astype(dw.dtype), None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def head_cross_entropy(
    features: Array,
    weight: Array,
    targets: Array,
    mask: Array,
    *,
    chunk_size: int | None = None,
    dtype: jnp.dtype | None = None,
) -> tuple[Array, Array]:
    """Fused LM head + summed CE without materialising the logits of the whole batch.

    features ``[..., F]`` (the head's input), weight ``[F, V]``, targets int / mask bool
    ``[...]`` -> (sum of CE over masked positions, their count), as
    ``head_cross_entropy_reference``. Positions go through in chunks of ``chunk_size`` (default
    ``auto_head_chunk(V)``);
    each chunk's logits ``[chunk, V]`` are reduced at once to logsumexp and the target
    logit. Under differentiation the same pass also forms the input and weight gradients
    (softmax - onehot, two more matmuls per chunk), so the backward is a scaling. The
    matmuls run in ``dtype`` (default: the features' dtype) with float32 (float64 under
    x64) accumulation; logsumexp and gradients accumulate in that precision too. Targets
    of masked positions may be any value (ignored, e.g. padding ids).
    """
    if chunk_size is None:
        chunk_size = auto_head_chunk(weight.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _fused(
        features,
        weight,
        targets,
        mask,
        int(chunk_size),
        None if dtype is None else jnp.dtype(dtype),
    )


def next_token_targets(tokens: Array, ignore_id: int | None = None) -> tuple[Array, Array]:
    """Targets and mask for logits[:, t] scoring token t+1: ``[B, T]`` -> ``[B, T-1]`` each."""
    targets = tokens[:, 1:]
    mask = jnp.ones(targets.shape, bool) if ignore_id is None else targets != ignore_id
    return targets, mask


def next_token_ce(
    logits: Array, tokens: Array, ignore_id: int | None = None
) -> tuple[Array, Array]:
    """Mean next-token CE (logits[:, :-1] vs tokens[:, 1:]) and the token count.

    logits ``[B, T, V]``, tokens ``[B, T]``. With no counted token the mean is 0, not NaN.
    """
    targets, mask = next_token_targets(tokens, ignore_id)
    total, count = token_cross_entropy(logits[:, :-1], targets, mask)
    return total / jnp.maximum(count, 1.0), count


def coherence_loss(states: Array, mask: Array | None = None) -> Array:
    """mean_t (1 - cos(z_t, z_{t+1})) over adjacent phase states (spec §14.2).

    states ``[B, T, 2, d]``; mask ``[B, T]`` (a pair counts if both ends are real).
    Returns 0 when T < 2.
    """
    if states.shape[1] < 2:
        return jnp.zeros((), p2d.acc_dtype(states.dtype))
    cos = p2d.coherence(states[:, :-1], states[:, 1:])
    if mask is None:
        return jnp.mean(1.0 - cos)
    pair = (mask[:, :-1] & mask[:, 1:]).astype(cos.dtype)
    return jnp.sum((1.0 - cos) * pair) / jnp.maximum(jnp.sum(pair), 1.0)


def energy_loss(states: Array, target: float = 1.0, mask: Array | None = None) -> Array:
    """mean (|z| - target)² over elements of the phase states (spec §14.4). ``[B, T, 2, d]``."""
    sq = jnp.square(p2d.modulus(states) - target)  # [B, T, d]
    if mask is None:
        return jnp.mean(sq)
    w = mask.astype(sq.dtype)[..., None]
    return jnp.sum(sq * w) / jnp.maximum(jnp.sum(w) * sq.shape[-1], 1.0)
