"""Phase2D algebra: complex arithmetic on real arrays, as pure functions.

Layout
------
A Phase2D tensor is a real array of shape ``[..., 2, d]``: index 0 of axis -2 holds the real
parts, index 1 the imaginary parts ("planar" layout). The original PyTorch code stores
``[..., d, 2]`` (pairs on the last axis); ``from_torch_layout``/``to_torch_layout`` convert.

Why planar ``[..., 2, d]``:

* The feature axis ``d`` is the minor (contiguous) axis, so every elementwise op reads
  lane-dense vectors on TPU and coalesced rows on GPU. A trailing axis of 2 would waste
  64 of 128 lanes on TPU and halve the useful width of every GPU memory transaction.
* ``[..., 2, d]`` is bit-identical in memory to the *concat* layout ``[re_0..re_{d-1},
  im_0..im_{d-1}]`` of width ``2d``, so ``reshape(..., 2 * d)`` is free (a bitcast in XLA).
  A complex linear map is therefore ONE real GEMM of the concat vector against the block
  matrix ``[[W_re, W_im], [-W_im, W_re]]``: no transposes, no stacking, bf16 Tensor Cores.
* The real/imaginary planes stay separate arrays-in-one, so splitting them is a strided
  view that XLA fuses into the consumer.

Every parameter stays real (complex weights are stored as ``*_re``/``*_im`` pairs), so
optimizers, checkpoints and sharding never see complex dtypes.

Numerics: moduli, norms and coherences are computed in at least float32 (float64 stays
float64) and cast back to the input dtype, because the 1e-8 epsilon is below bf16 resolution.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

MODULUS_EPS = 1e-8  # inside the square root, as in the original
COHERENCE_EPS = 1e-8


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype for ``dtype``: float32, or float64 when the input is float64."""
    return jnp.promote_types(dtype, jnp.float32)


def split(x: Array) -> tuple[Array, Array]:
    """``[..., 2, d]`` -> (real ``[..., d]``, imag ``[..., d]``)."""
    return x[..., 0, :], x[..., 1, :]


def join(re: Array, im: Array) -> Array:
    """(real ``[..., d]``, imag ``[..., d]``) -> ``[..., 2, d]``."""
    return jnp.stack([re, im], axis=-2)


def from_torch_layout(x: Array) -> Array:
    """``[..., d, 2]`` (the original's layout) -> ``[..., 2, d]``."""
    return jnp.swapaxes(x, -1, -2)


def to_torch_layout(x: Array) -> Array:
    """``[..., 2, d]`` -> ``[..., d, 2]`` (the original's layout)."""
    return jnp.swapaxes(x, -1, -2)


def to_concat(x: Array) -> Array:
    """``[..., 2, d]`` -> concat layout ``[..., 2d]`` = [re_0..re_{d-1}, im_0..im_{d-1}] (free)."""
    return x.reshape(*x.shape[:-2], 2 * x.shape[-1])


def from_concat(x: Array) -> Array:
    """Concat layout ``[..., 2d]`` -> ``[..., 2, d]`` (free)."""
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)


def from_real(x: Array, mode: Literal["split", "zero_imag"] = "split") -> Array:
    """Real ``[..., n]`` -> Phase2D: halves as (re, im) for 'split', or imag = 0."""
    if mode == "split":
        return from_concat(x)
    if mode == "zero_imag":
        return join(x, jnp.zeros_like(x))
    raise ValueError(f"from_real: mode must be 'split' or 'zero_imag', got {mode!r}")


def multiply(a: Array, b: Array) -> Array:
    """Elementwise complex product a ⊙ b. ``[..., 2, d]`` (broadcasting)."""
    ar, ai = split(a)
    br, bi = split(b)
    return join(ar * br - ai * bi, ar * bi + ai * br)


def conjugate(x: Array) -> Array:
    """(re, -im). ``[..., 2, d]``."""
    re, im = split(x)
    return join(re, -im)


def modulus_sq(x: Array) -> Array:
    """re² + im², ``[..., 2, d]`` -> ``[..., d]``."""
    re, im = split(x)
    return re * re + im * im


def modulus(x: Array, eps: float = MODULUS_EPS) -> Array:
    """sqrt(re² + im² + eps) with the epsilon inside the root. ``[..., 2, d]`` -> ``[..., d]``.

    Computed in (at least) float32 and returned in that accumulation dtype.
    """
    xa = x.astype(acc_dtype(x.dtype))
    return jnp.sqrt(modulus_sq(xa) + eps)


def normalize(x: Array, eps: float = MODULUS_EPS) -> Array:
    """x / |x| per element (a unit phasor; the zero vector maps to 0). ``[..., 2, d]``."""
    m = modulus(x, eps)
    return (x.astype(m.dtype) / m[..., None, :]).astype(x.dtype)


def apply_iota(x: Array) -> Array:
    """Multiply by i: (re, im) -> (-im, re). ``[..., 2, d]``."""
    re, im = split(x)
    return join(-im, re)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """x ⊙ (cos + i·sin), a per-element rotation. x ``[..., 2, d]``, cos/sin ``[..., d]``."""
    re, im = split(x)
    return join(re * cos - im * sin, re * sin + im * cos)


def cayley(a: Array) -> tuple[Array, Array]:
    """Unit phasor from a free real parameter, with no trigonometry.

    c = (1 - a²)/(1 + a²), s = 2a/(1 + a²): the half-angle map a = tan(θ/2), so c = cos θ and
    s = sin θ exactly, with θ = 2·atan(a) ∈ (-π, π). Shapes follow ``a``.
    """
    a2 = a * a
    inv = 1.0 / (1.0 + a2)
    return (1.0 - a2) * inv, 2.0 * a * inv


def real_inner(a: Array, b: Array) -> Array:
    """Σ_k Re(a_k · conj(b_k)) = Σ_k (a_r b_r + a_i b_i). ``[..., 2, d]`` -> ``[...]``."""
    return jnp.sum(a * b, axis=(-2, -1))


def dot(a: Array, b: Array) -> Array:
    """Complex inner product Σ_k a_k·conj(b_k) as (re, im): ``[..., 2, d]`` -> ``[..., 2]``."""
    ar, ai = split(a)
    br, bi = split(b)
    return jnp.stack([jnp.sum(ar * br + ai * bi, -1), jnp.sum(ai * br - ar * bi, -1)], -1)


def l2_norm(x: Array, eps: float = MODULUS_EPS) -> Array:
    """sqrt(Σ_k (re² + im²) + eps) over the flattened 2d-vector. ``[..., 2, d]`` -> ``[...]``."""
    xa = x.astype(acc_dtype(x.dtype))
    return jnp.sqrt(jnp.sum(xa * xa, axis=(-2, -1)) + eps)


def coherence(a: Array, b: Array, eps: float = COHERENCE_EPS) -> Array:
    """The correct cosine coherence Re<a, b> / (‖a‖ ‖b‖ + eps) in [-1, 1].

    ‖·‖ is the L2 norm of the 2d-real vector (with 1e-8 inside the root, as the original's
    semantic bank, memory and coherence objective use). ``[..., 2, d]`` -> ``[...]``.
    """
    dt = acc_dtype(jnp.result_type(a.dtype, b.dtype))
    a, b = a.astype(dt), b.astype(dt)
    return real_inner(a, b) / (l2_norm(a) * l2_norm(b) + eps)


def coherence_l1(a: Array, b: Array, eps: float = COHERENCE_EPS) -> Array:
    """The original ``phase2d_coherence``: Re<a, b> / ((Σ_k|a_k|)(Σ_k|b_k|) + eps).

    The denominator is a product of L1 norms of the per-element moduli, so coh(a, a) ≈ 1.27/d
    for random vectors (the original's "Bug 1"). Kept because the coupling loss uses it and
    parity is the goal. ``[..., 2, d]`` -> ``[...]``.
    """
    dt = acc_dtype(jnp.result_type(a.dtype, b.dtype))
    a, b = a.astype(dt), b.astype(dt)
    den = jnp.sum(modulus(a), -1) * jnp.sum(modulus(b), -1) + eps
    return real_inner(a, b) / den


def block_kernel(w_re: Array, w_im: Array) -> Array:
    """Real block matrix of the complex map W = W_re + i W_im, for the concat layout.

    ``w_re``, ``w_im``: ``[in, out]``. Returns ``[2 in, 2 out]`` = [[W_re, W_im], [-W_im, W_re]],
    so that concat(y) = concat(x) @ block gives y = x W (complex).
    """
    top = jnp.concatenate([w_re, w_im], axis=1)
    bottom = jnp.concatenate([-w_im, w_re], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def complex_linear(
    x: Array,
    w_re: Array,
    w_im: Array,
    b_re: Array | None = None,
    b_im: Array | None = None,
    *,
    dtype: jnp.dtype | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> Array:
    """y = x W + b for complex W, b as ONE real GEMM in the concat layout.

    x ``[..., 2, in]``; w_re, w_im ``[in, out]``; b_re, b_im ``[out]`` -> ``[..., 2, out]``.
    ``dtype`` is the compute dtype of the GEMM (e.g. bfloat16); default: promote x and W.
    """
    dt = dtype or jnp.result_type(x.dtype, w_re.dtype)
    kernel = block_kernel(w_re, w_im).astype(dt)
    y = jnp.matmul(to_concat(x).astype(dt), kernel, precision=precision)
    if b_re is not None:
        y = y + jnp.concatenate([b_re, b_im]).astype(dt)
    return from_concat(y)
