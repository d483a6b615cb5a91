"""Resonant Gradient Descent (RGD) of the Wave-Native GPT (spec §2.10) as an optax transform.

RGD is AdamW whose update, for tensors of rank >= 2, is reshaped to 2-D (first axis × rest)
and gated in the 2-D Fourier domain. Per step (global count n, per-parameter count k)::

    p  <- p·(1 - lr·wd)                          decoupled weight decay, first
    m  <- b1·m + (1-b1)·g;  v <- b2·v + (1-b2)·g²
    u  =  (m / (1-b1^k)) / (sqrt(v / (1-b2^k)) + eps)          the Adam update
    α  =  min(1, n / warmup)·s   (warmup 0: α = s)
    if rank >= 2 and α > 0:
        P̂ = FFT2(p), Û = FFT2(u);  Wn = |P̂| / (max|P̂| + eps), Gn = |Û| / (max|Û| + eps)
        ρ = α·sqrt(Wn·Gn + eps) + (1 - α);   u <- Re IFFT2(Û·ρ)
    p  <- p - lr·u

The FFT is of the Adam update (not of the gradient, as the original's README says), the gate
sees the already-decayed parameter, and ρ ∈ [1-α, 1]: a spectral shrink, never a boost.
The transform returns ``new_p - p`` as its update, so it chains like ``optax.adamw``
(clip before it; a schedule as ``learning_rate``, evaluated at the pre-increment count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class RGDState(NamedTuple):
    """count: global step n (drives α and the schedule); steps: per-parameter step counts
    (drive the bias correction); mu, nu: Adam moments."""

    count: Array
    steps: Any
    mu: Any
    nu: Any


def resonance_gate(update: Array, param: Array, alpha: Array, eps: float) -> Array:
    """Re IFFT2(FFT2(u)·ρ) of a rank >= 2 update, on its (shape[0], -1) view."""
    shape = update.shape
    u2 = update.reshape(shape[0], -1)
    p2 = param.reshape(shape[0], -1)
    u_hat = jnp.fft.fft2(u2)
    p_mag = jnp.abs(jnp.fft.fft2(p2))
    u_mag = jnp.abs(u_hat)
    wn = p_mag / (jnp.max(p_mag) + eps)
    gn = u_mag / (jnp.max(u_mag) + eps)
    rho = alpha * jnp.sqrt(wn * gn + eps) + (1.0 - alpha)
    return jnp.fft.ifft2(u_hat * rho).real.astype(update.dtype).reshape(shape)


def rgd(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    resonance_strength: float = 0.3,
    resonance_warmup: int = 500,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """Resonant Gradient Descent (see the module docstring).

    mask: pytree of bools (or a function of the params returning one) selecting the
    parameters that get weight decay; None decays every parameter, as the original does.
    """

    def init(params: Any) -> RGDState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        steps = jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)
        return RGDState(
            jnp.zeros((), jnp.int32), steps, zeros, jax.tree.map(jnp.zeros_like, params)
        )

    def update(grads: Any, state: RGDState, params: Any = None) -> tuple[Any, RGDState]:
        if params is None:
            raise ValueError("rgd needs the parameters: call update(grads, state, params)")
        n = state.count + 1
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        if resonance_warmup > 0:
            alpha = jnp.minimum(1.0, n / resonance_warmup) * resonance_strength
        else:
            alpha = jnp.asarray(resonance_strength, jnp.float32)
        decay = mask(params) if callable(mask) else mask
        if decay is None:
            decay = jax.tree.map(lambda _: True, params)

        def leaf(g, p, m, v, k, dec):
            k = k + 1
            acc = p.dtype
            p_dec = p * jnp.where(dec, 1.0 - lr * weight_decay, 1.0).astype(acc)
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * jnp.square(g)
            m_hat = m / (1.0 - b1 ** k.astype(acc))
            v_hat = v / (1.0 - b2 ** k.astype(acc))
            u = m_hat / (jnp.sqrt(v_hat) + eps)
            if p.ndim >= 2:
                gated = resonance_gate(u, p_dec, alpha.astype(acc), eps)
                u = jnp.where(alpha > 0, gated, u)
            new_p = p_dec - lr * u
            return new_p - p, m, v, k

        out = jax.tree.map(leaf, grads, params, state.mu, state.nu, state.steps, decay)
        is_out = lambda x: isinstance(x, tuple) and len(x) == 4  # noqa: E731
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=is_out)  # noqa: E731
        return pick(0), RGDState(n, pick(3), pick(1), pick(2))

    return optax.GradientTransformation(init, update)
