"""Training objectives as pure functions (spec §14), token-weighted and NaN-free.

Each function returns float32 (float64 under x64) scalars. Differences from the original,
all deliberate: the CE of an empty batch is 0 (the original returned NaN), and the coherence
and energy objectives can be restricted to real (non-padding) positions with ``mask``.
"""

from __future__ import annotations

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
