"""Pure functions of the Wave-Native GPT (family ``wavegpt``): wave-packet features and the
three attention forms (cosine interference with softmax, pure-wave quadratic, causal linear).

Shapes: B batch, T query positions, S key positions, H heads, W waves, Hh harmonics,
D head width. Positions are absolute integers, so a chunk of a sequence at offset ``pos``
gives the same numbers as the whole sequence (the KV cache / recurrent state rely on it).
Trigonometry, normalisations, softmax and running sums are float32 (float64 under x64)
whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

KERNELS = ("elu_plus_one", "sigmoid", "exp", "identity")
LINEAR_KERNELS = ("elu_plus_one", "sigmoid", "exp")
LINEAR_EPS = 1e-6  # the original's denominator guard of the linear form
NORM_EPS = 1e-12  # F.normalize's floor on the L2 norm


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32, or float64 when the input already is."""
    return jnp.promote_types(dtype, jnp.float32)


def wave_state(
    ids: Array,
    positions: Array,
    base_freqs: Array,
    harmonic_amps: Array,
    phases: Array,
    pos_freq: Array,
) -> Array:
    """The wave-packet features of tokens, input of ``wave_to_embed``.

    ids int ``[B, T]``, positions int ``[T]``; tables ``base_freqs``/``phases`` ``[V, W]``,
    ``harmonic_amps`` ``[V, W, Hh]``, ``pos_freq`` ``[W]``. Returns ``[B, T, 2·W·Hh]`` =
    [A·sin θ ; A·cos θ] with index w·Hh + h and θ_{w,h} = 2π·f_w·(h+1) + φ_w + p·ω_w.
    The "frequency" f multiplies the harmonic number only (no time variable): it acts as a
    token-specific phase offset; the position enters only through p·ω.
    """
    acc = acc_dtype(base_freqs.dtype)
    hh = harmonic_amps.shape[-1]
    mults = jnp.arange(1, hh + 1, dtype=acc)
    f = jnp.take(base_freqs, ids, axis=0).astype(acc)[..., None]  # [B, T, W, 1]
    phi = jnp.take(phases, ids, axis=0).astype(acc)[..., None]
    amp = jnp.take(harmonic_amps, ids, axis=0).astype(acc)  # [B, T, W, Hh]
    rot = positions.astype(acc)[:, None, None] * pos_freq.astype(acc)[None, :, None]  # [T,W,1]
    theta = 2.0 * math.pi * f * mults + phi + rot
    b, t = ids.shape
    sin = (amp * jnp.sin(theta)).reshape(b, t, -1)
    cos = (amp * jnp.cos(theta)).reshape(b, t, -1)
    return jnp.concatenate([sin, cos], axis=-1)


def l2_normalize(x: Array) -> Array:
    """x / max(‖x‖, 1e-12) over the last axis, in the accumulation dtype."""
    x = x.astype(acc_dtype(x.dtype))
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, NORM_EPS)


def causal_mask(q_pos: Array, k_pos: Array) -> Array:
    """``[T, S]`` bool: key position <= query position."""
    return k_pos[None, :] <= q_pos[:, None]


def interference_weights(q_hat: Array, k_hat: Array, temperature: Array, mask: Array) -> Array:
    """Cosine-similarity softmax attention.

    q_hat ``[B, T, H, W]``, k_hat ``[B, S, H, W]`` (unit vectors),
    temperature scalar, mask bool ``[T, S]`` -> probabilities ``[B, H, T, S]`` (apply them,
    after dropout, with ``attend``). Scores q̂·k̂/τ are bounded by ±1/τ.
    """
    acc = acc_dtype(q_hat.dtype)
    s = jnp.einsum("bthw,bshw->bhts", q_hat.astype(acc), k_hat.astype(acc))
    s = s / temperature.astype(acc)
    s = jnp.where(mask[None, None], s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


def attend(probs: Array, v: Array) -> Array:
    """``[B, H, T, S]`` weights times v ``[B, S, H, D]`` -> ``[B, T, H, D]`` (accumulated)."""
    acc = acc_dtype(probs.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(acc), v.astype(acc))


def pure_wave_features(freq: Array, phase: Array, positions: Array) -> Array:
    """normalize(sin(freq·t + phase))·W^¼ over the waves.

    freq, phase ``[B, T, H, W]``, positions int ``[T]`` -> ``[B, T, H, W]`` (accumulated).
    The W^¼ on both sides makes q̂·k̂ range over [-√W, √W].
    """
    acc = acc_dtype(freq.dtype)
    t = positions.astype(acc)[None, :, None, None]
    wave = jnp.sin(freq.astype(acc) * t + phase.astype(acc))
    return l2_normalize(wave) * freq.shape[-1] ** 0.25


def apply_kernel(scores: Array, kernel: str) -> Array:
    """The pointwise kernel κ: elu(x)+1, sigmoid(x), exp(x) or identity."""
    if kernel == "elu_plus_one":
        return jax.nn.elu(scores) + 1.0
    if kernel == "sigmoid":
        return jax.nn.sigmoid(scores)
    if kernel == "exp":
        return jnp.exp(scores)
    if kernel == "identity":
        return scores
    raise ValueError(f"unknown pure-wave kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def pure_wave_weights(
    q_feat: Array, k_feat: Array, scale: Array, kernel: str, q_pos: Array, k_pos: Array
) -> Array:
    """The original's softmax-free quadratic weights A ``[B, H, T, S]``.

    A_ij = κ(q̂_i·k̂_j·scale_h) for j <= i (future: κ(-∞) = 0; identity kernel: 0), divided
    by √(i+1) (float32, as the original) with i the absolute query position. Rows do not
    sum to 1.
    q_feat ``[B, T, H, W]``, k_feat ``[B, S, H, W]``, scale ``[H]``.
    """
    acc = acc_dtype(q_feat.dtype)
    s = jnp.einsum("bthw,bshw->bhts", q_feat.astype(acc), k_feat.astype(acc))
    s = s * scale.astype(acc)[None, :, None, None]
    mask = causal_mask(q_pos, k_pos)[None, None]
    if kernel == "identity":
        a = jnp.where(mask, s, 0.0)
    else:
        # κ(-inf) is 0 for the three kernels; masking after κ avoids inf arithmetic in grads.
        a = jnp.where(mask, apply_kernel(jnp.where(mask, s, 0.0), kernel), 0.0)
    # The original divides by a float32 sqrt(arange(1, T+1).float()) in every dtype.
    root = jnp.sqrt(q_pos.astype(jnp.float32) + 1.0).astype(acc)
    return a / root[None, None, :, None]


def linear_features(feat: Array, kernel: str) -> Array:
    """The kernel feature map φ = κ applied to q̂ or k̂ separately (linear form)."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(
            f"kernel {kernel!r} has no linear form; choose one of {', '.join(LINEAR_KERNELS)}"
        )
    return apply_kernel(feat, kernel)


def linear_attention_quadratic(phi_q: Array, phi_k: Array, v: Array) -> Array:
    """Reference of the causal linear form computed quadratically with a causal mask.

    y_i = Σ_{j<=i} (φq_i·φk_j) v_j / (Σ_{j<=i} φq_i·φk_j + 1e-6).
    phi_q/phi_k ``[B, T, H, W]``, v ``[B, T, H, D]`` -> ``[B, T, H, D]`` (accumulated).
    """
    acc = acc_dtype(phi_q.dtype)
    t = phi_q.shape[1]
    a = jnp.einsum("bihw,bjhw->bhij", phi_q.astype(acc), phi_k.astype(acc))
    a = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], a, 0.0)
    num = jnp.einsum("bhij,bjhd->bihd", a, v.astype(acc))
    den = jnp.swapaxes(a.sum(-1), 1, 2)[..., None]  # [B, T, H, 1]
    return num / (den + LINEAR_EPS)


def causal_linear_attention(
    phi_q: Array,
    phi_k: Array,
    v: Array,
    carry: tuple[Array, Array] | None = None,
    chunk: int = 64,
) -> tuple[Array, tuple[Array, Array]]:
    """Causal linear attention in O(T) with a recurrent state, chunk by chunk.

    y_i = φq_i·(S_0 + Σ_{j<=i} φk_j v_jᵀ) / (φq_i·(z_0 + Σ_{j<=i} φk_j) + 1e-6).
    phi_q/phi_k ``[B, T, H, W]``, v ``[B, T, H, D]``; carry (S ``[B, H, W, D]``,
    z ``[B, H, W]``) of the positions before (zeros if None). Returns (y ``[B, T, H, D]``,
    the carry after the last position). Inside a chunk the weights are the masked
    quadratic form; across chunks only the carry flows, so memory is O(chunk² + W·D).
    """
    acc = acc_dtype(phi_q.dtype)
    b, t, h, w = phi_q.shape
    d = v.shape[-1]
    if carry is None:
        carry = (jnp.zeros((b, h, w, d), acc), jnp.zeros((b, h, w), acc))
    c = max(1, min(chunk, t))
    n = -(-t // c)
    pad = n * c - t

    def split(x: Array) -> Array:
        # Zero padding: a zero key adds nothing to the carry; padded queries are dropped.
        x = jnp.pad(x.astype(acc), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    tril = jnp.tril(jnp.ones((c, c), bool))[None, None]

    def body(state, xs):
        s, z = state
        q, k, val = xs
        a = jnp.where(tril, jnp.einsum("bihw,bjhw->bhij", q, k), 0.0)
        num = jnp.einsum("bhij,bjhd->bihd", a, val) + jnp.einsum("bihw,bhwd->bihd", q, s)
        den = jnp.swapaxes(a.sum(-1), 1, 2) + jnp.einsum("bihw,bhw->bih", q, z)
        y = num / (den[..., None] + LINEAR_EPS)
        s = s + jnp.einsum("bjhw,bjhd->bhwd", k, val)
        z = z + k.sum(1)
        return (s, z), y

    carry, ys = jax.lax.scan(
        body, tuple(x.astype(acc) for x in carry), (split(phi_q), split(phi_k), split(v))
    )
    y = jnp.moveaxis(ys, 0, 1).reshape(b, n * c, h, d)[:, :t]
    return y, carry
