"""Phase2D normalisation and the original's activations, as pure functions.

Shapes use the planar Phase2D layout ``[..., 2, d]`` of ``qpf.ops.phase2d``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qpf.ops import phase2d as p2d

Array = jax.Array

LAYER_NORM_EPS = 1e-6


def phase_layer_norm(x: Array, scale: Array, eps: float = LAYER_NORM_EPS) -> Array:
    """The original Phase2DLayerNorm (spec §2.5): normalise moduli, keep directions.

    m = |x| (eps 1e-8 inside the root), n = (m - mean m)/sqrt(var m + eps) over d (biased
    variance), out = (x/m)·(n·scale). The signed magnitude n·scale is zero-mean, so about half
    of the elements come out phase-flipped by π: a quirk of the original kept for fidelity.
    There is no shift. Accumulates in float32. x ``[..., 2, d]``, scale ``[d]``.
    """
    m = p2d.modulus(x)  # [..., d] in the accumulation dtype
    mu = jnp.mean(m, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(m - mu), axis=-1, keepdims=True)
    n = (m - mu) * jax.lax.rsqrt(var + eps)
    gain = n * scale.astype(m.dtype) / m
    return (x.astype(m.dtype) * gain[..., None, :]).astype(x.dtype)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as PyTorch's default; jax.nn.gelu defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)


def real_gelu_scale(u: Array) -> Array:
    """u <- GELU(Re u)·u (semantic/context/language banks): a real scale on both parts."""
    re, _ = p2d.split(u)
    return u * gelu(re)[..., None, :]


def split_gelu(u: Array) -> Array:
    """(re, im) <- (GELU(re), im·σ(re)) (morphology bank): a split, phase-destroying map."""
    re, im = p2d.split(u)
    return p2d.join(gelu(re), im * jax.nn.sigmoid(re))


def real_part_dropout(u: Array, rate: float, rng: jax.Array | None) -> Array:
    """u + u·Dropout(Re u), the original's "dropout" pattern (spec §2.7, bug 22.7).

    With ``rng`` None (evaluation) Dropout is the identity, giving u·(1 + Re u); with an rng,
    surviving elements get u·Re(u)/(1 - rate). Callers decide whether the original applied it
    in evaluation (morphology, orthography) or only in training (semantic, coupler).
    """
    re, _ = p2d.split(u)
    if rng is not None and rate > 0.0:
        kept = jax.random.bernoulli(rng, 1.0 - rate, re.shape)
        re = jnp.where(kept, re / (1.0 - rate), 0.0)
    return u + u * re[..., None, :]


RMS_NORM_EPS = 1e-6


def complex_rms_norm(x: Array, scale: Array, eps: float = RMS_NORM_EPS) -> Array:
    """Phase-preserving complex RMS norm: z / RMS(|z|) · gain, no mean subtraction.

    RMS(|z|) = sqrt(mean_d(re² + im²) + eps) over the feature axis, accumulated in float32;
    the gain ``scale [d]`` is real, so every element keeps its phase (unlike
    ``phase_layer_norm``, whose zero-mean magnitudes flip about half the phases).
    x ``[..., 2, d]`` -> ``[..., 2, d]`` in x's dtype.
    """
    xa = x.astype(p2d.acc_dtype(x.dtype))
    ms = jnp.mean(p2d.modulus_sq(xa), axis=-1, keepdims=True)  # [..., 1]
    gain = jax.lax.rsqrt(ms + eps) * scale.astype(xa.dtype)  # [..., d]
    return (xa * gain[..., None, :]).astype(x.dtype)


def modrelu(x: Array, bias: Array, eps: float = p2d.MODULUS_EPS) -> Array:
    """modReLU: relu(|z| + b)·z/|z|, phase kept. x ``[..., 2, d]``, bias ``[d]``.

    |z| = sqrt(re² + im² + eps), so z = 0 maps to 0 with finite gradients.
    """
    m = p2d.modulus(x, eps)  # [..., d] float32
    gain = jax.nn.relu(m + bias.astype(m.dtype)) / m
    return (x.astype(m.dtype) * gain[..., None, :]).astype(x.dtype)


def modswish(x: Array, beta: Array, bias: Array, eps: float = p2d.MODULUS_EPS) -> Array:
    """modSwish: |z|·σ(β|z| + b) on the magnitude, phase kept: z·σ(β|z| + b).

    Written as z·σ(..) there is no division by |z|, so z = 0 is smooth.
    x ``[..., 2, d]``, beta, bias ``[d]``.
    """
    m = p2d.modulus(x, eps)
    gate = jax.nn.sigmoid(beta.astype(m.dtype) * m + bias.astype(m.dtype))
    return (x.astype(m.dtype) * gate[..., None, :]).astype(x.dtype)
