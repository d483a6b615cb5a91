"""The v3 original's local update rules (spec v2_v3.md §B4) as pure functions
``(weights, activity) -> new weights``, to be applied outside ``jax.grad`` (the original
writes them through ``.data``, invisible to autograd). None of them is part of the original
``BrainInspiredLLM``'s learning path; they are reproduced here as specified, bugs included,
with a switch for the standard STDP pairing.

Shapes: weights ``[in, out]`` (y = x W), activity ``[B, T, in]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qpf.ops.v3_ops import stm_ema

Array = jax.Array

__all__ = ["ema_update", "hebbian_update", "stdp_update", "stm_ema"]


def hebbian_update(w: Array, x: Array, lr: float = 0.01) -> Array:
    """``HebbianLearning``: y = x W, W <- W + lr·outer(mean_{b,t} x, mean_{b,t} y).

    No decay or normalisation (upstream), so |W| grows without bound under repetition.
    """
    y = x @ w
    return w + lr * jnp.outer(jnp.mean(x, (0, 1)), jnp.mean(y, (0, 1)))


def stdp_update(
    w: Array,
    x: Array,
    lr: float = 0.01,
    tau: float = 20.0,
    threshold: float = 0.5,
    upstream_pairing: bool = True,
) -> Array:
    """``SpikeTimingDependentPlasticity``: y = x W; spikes x > threshold, y > threshold,
    averaged over the batch; for t = 1..T (``lax.scan``): both traces decay by e^{-1/tau},
    then add the step's spikes; ΔW accumulates over t.

    upstream_pairing=True: ΔW_t = lr·outer(pre_t, post_trace) - lr·outer(pre_trace, post_t)
    (the original's anti-causal "LTP" term; same-step coincidences cancel).
    False: the standard rule lr·outer(pre_trace, post_t) - lr·outer(pre_t, post_trace).
    """
    y = x @ w
    pre = jnp.mean((x > threshold).astype(w.dtype), 0)  # [T, in]
    post = jnp.mean((y > threshold).astype(w.dtype), 0)  # [T, out]
    decay = math.exp(-1.0 / tau)

    def step(carry, spikes):
        pre_tr, post_tr, dw = carry
        pre_t, post_t = spikes
        pre_tr = decay * pre_tr + pre_t
        post_tr = decay * post_tr + post_t
        ltp, ltd = jnp.outer(pre_t, post_tr), jnp.outer(pre_tr, post_t)
        dw = dw + (ltp - ltd if upstream_pairing else ltd - ltp)
        return (pre_tr, post_tr, dw), None

    zeros = (jnp.zeros(w.shape[0], w.dtype), jnp.zeros(w.shape[1], w.dtype), jnp.zeros_like(w))
    (_, _, dw), _ = jax.lax.scan(step, zeros, (pre, post))
    return w + lr * dw


def ema_update(old: Array, value: Array, momentum: float) -> Array:
    """The original's activity / correlation / error-signal EMAs: m·old + (1 - m)·value."""
    return momentum * old + (1.0 - momentum) * value
