"""Quantum Field Entanglement (QFE) loss of the Wave-Native GPT (spec §2.11), as pure functions.

L = CE + λ·L_coh. The coherence compares, along the sequence axis, the temporal spectra of
the predicted distributions and of the targets::

    P = softmax(logits / temperature)                                  [B, T, V]
    signals (P, onehot(y))                 (V <= 256: the headline version)
            (P·R, R[y])                    (V > 256: fixed random projection R [V, 256])
    X_o, X_t = rFFT over T                                             [B, T//2+1, F]
    mask = (|X_o| > τ_A) & (|X_t| > τ_A)   (strict, both amplitudes)
    L_coh = Σ mask·(|X_o||X_t| - Re(X_o·conj X_t)) / (Σ mask + 1e-8)

The summand equals A_o·A_t·(1 - cos Δφ) of the original but has no phase singularity (no
``angle``), so its gradient is finite everywhere. Targets are constant: gradients reach only P.
The original draws R lazily once per process and never saves it; here R comes from a seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

PROJECTION_DIM = 256
DEN_EPS = 1e-8


def qfe_projection(vocab_size: int, dim: int = PROJECTION_DIM, seed: int = 0) -> Array:
    """The fixed random projection R ``[V, dim]`` with entries N(0, 1/dim)."""
    return jax.random.normal(jax.random.key(seed), (vocab_size, dim)) / jnp.sqrt(dim)


def _safe_abs(z: Array) -> Array:
    # |z| with a zero (not NaN) gradient at z = 0; such bins are masked out anyway.
    sq = jnp.square(z.real) + jnp.square(z.imag)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def spectral_coherence(
    logits: Array,
    targets: Array,
    *,
    threshold: float = 0.01,
    temperature: float = 1.0,
    projection: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """The coherence term L_coh (a scalar in the logits' accumulation dtype).

    logits ``[B, T, V]``, targets int ``[B, T]``; projection ``[V, F]`` or None (one-hot
    signals). mask ``[B, T]`` bool (not in the original, which never pads): positions where
    it is False contribute a zero signal to both spectra.
    """
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    probs = jax.nn.softmax(logits.astype(acc) / temperature, axis=-1)
    if projection is None:
        sig_o = probs
        sig_t = jax.nn.one_hot(targets, logits.shape[-1], dtype=acc)
    else:
        proj = projection.astype(acc)
        sig_o = probs @ proj
        sig_t = jnp.take(proj, targets, axis=0)
    if mask is not None:
        valid = mask[..., None].astype(acc)
        sig_o, sig_t = sig_o * valid, sig_t * valid
    x_o = jnp.fft.rfft(sig_o, axis=1)
    x_t = jnp.fft.rfft(sig_t, axis=1)
    a_o, a_t = _safe_abs(x_o), jnp.abs(x_t)
    valid = (a_o > threshold) & (a_t > threshold)
    term = a_o * a_t - (x_o * jnp.conj(x_t)).real
    return jnp.sum(jnp.where(valid, term, 0.0)) / (jnp.sum(valid).astype(acc) + DEN_EPS)


def mean_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean CE over all B·T positions (the original's ``F.cross_entropy``)."""
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(acc), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def qfe_loss(
    logits: Array,
    targets: Array,
    lambda_coherence: float = 0.05,
    *,
    threshold: float = 0.01,
    temperature: float = 1.0,
    projection: Array | None = None,
) -> dict[str, Array]:
    """The original's ``QuantumFieldEntanglementLoss(..., return_components=True)``.

    Returns total = ce + λ·coherence, ce (mean over B·T) and coherence. For V > 256 pass
    ``projection=qfe_projection(V)`` (the original switches to it automatically).
    """
    ce = mean_cross_entropy(logits, targets)
    coh = spectral_coherence(
        logits, targets, threshold=threshold, temperature=temperature, projection=projection
    )
    return {"total": ce + lambda_coherence * coh, "ce": ce, "coherence": coh}
