"""Pure functions of the v2 "Quantum-Inspired LM" forward pass (spec v2_v3.md §A3, §A11).

Every function takes plain arrays and a static ``causal`` switch:

* ``causal=False`` reproduces the original (qllm2 ``v2/``), leaks included: sequence means,
  forward-looking windows, batch-wide averages, token t+1 read at position t.
* ``causal=True`` is the same computation restricted to positions <= t of the same sample:
  running means, backward-looking windows of fixed width, per-sample averages.

Windowed sums are static sums of shifted copies (window widths are small Python ints), which
is exact and keeps float32 error at the level of a direct sum. Trig is done in float32 (or
float64 under x64) whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

GOLDEN_RATIO = (1.0 + math.sqrt(5.0)) / 2.0
PROCESSOR_GROWTH = 1.5


def _acc(x: Array) -> Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def shift(x: Array, offset: int, axis: int = 1) -> Array:
    """y[t] = x[t + offset] along ``axis`` with zeros outside ``[0, T)`` (static offset)."""
    n = x.shape[axis]
    if offset == 0:
        return x
    if abs(offset) >= n:
        return jnp.zeros_like(x)
    pad = [(0, 0)] * x.ndim
    if offset > 0:
        pad[axis] = (0, offset)
        return jax.lax.slice_in_dim(jnp.pad(x, pad), offset, offset + n, axis=axis)
    pad[axis] = (-offset, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, n, axis=axis)


def window_sum(x: Array, lo: int, hi: int, axis: int = 1) -> tuple[Array, Array]:
    """Sum of x[t + o] for o in [lo, hi] ∩ valid positions, and the count of valid terms.

    x ``[B, T, ...]`` (time on ``axis``) -> (sum like x, count ``[T]`` float32).
    """
    n = x.shape[axis]
    t = jnp.arange(n)
    total = sum(shift(x, o, axis) for o in range(lo, hi + 1))
    count = sum(((t + o >= 0) & (t + o < n)).astype(jnp.float32) for o in range(lo, hi + 1))
    return total, count


def running_mean(x: Array, axis: int = 1) -> Array:
    """Causal mean over positions <= t: cumsum / (t + 1). ``[B, T, ...]`` -> same shape."""
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = n
    count = jnp.arange(1, n + 1, dtype=x.dtype).reshape(shape)
    return jnp.cumsum(x, axis=axis) / count


def golden_phase(phase_init: Array, length: int, phase_dim: int) -> Array:
    """golden[t, i] = sin(t · φ · phase_init_i) for i < P: ``[T, P]``."""
    t = jnp.arange(length, dtype=phase_init.dtype)[:, None]
    return jnp.sin(t * GOLDEN_RATIO * phase_init[None, :phase_dim])


def phase_angles(golden: Array, semantic: Array, frequency: Array, position: Array) -> Array:
    """θ = golden + 0.5·S[x] + 0.3·f[x] + 0.2·Ppos[t].

    golden ``[T, P]``, semantic ``[B, T, P]``, frequency ``[B, T]``, position ``[T, P]``
    -> ``[B, T, P]``.
    """
    return golden[None] + 0.5 * semantic + 0.3 * frequency[..., None] + 0.2 * position[None]


def interference_context(heads: Array, causal: bool) -> Array:
    """C_h = T_h + 0.5·mean(T_h) over the sequence (faithful) or over positions <= t.

    heads ``[B, T, H, D]`` -> ``[B, T, H, D]``.
    """
    if causal:
        return heads + 0.5 * running_mean(heads, axis=1)
    return heads + 0.5 * jnp.mean(heads, axis=1, keepdims=True)


def multi_scale_coherence(p: Array, scales: tuple[int, ...], causal: bool) -> Array:
    """MS[b, j, s] = mean over the window's (k, d) of cos(p_k − m), m the window mean.

    Faithful: window [j, j+s), defined for 0 < s < T and j <= T − s, else 0. Causal: window
    [j−s+1, j], defined for j >= s − 1, else 0. Uses mean cos(p − m) = cos m·mean cos p +
    sin m·mean sin p. p ``[B, T, D]`` -> ``[B, T, len(scales)]``.
    """
    p = _acc(p)
    n = p.shape[1]
    t = jnp.arange(n)
    cols = []
    for s in scales:
        lo, hi = (1 - s, 0) if causal else (0, s - 1)
        sp, _ = window_sum(p, lo, hi)
        sc, _ = window_sum(jnp.cos(p), lo, hi)
        ss, _ = window_sum(jnp.sin(p), lo, hi)
        m = sp / s
        val = jnp.mean(jnp.cos(m) * sc / s + jnp.sin(m) * ss / s, axis=-1)
        valid = (t >= s - 1) if causal else ((t <= n - s) & (s < n))
        cols.append(jnp.where(valid[None, :], val, 0.0))
    return jnp.stack(cols, axis=-1)


def normalize_rows(x: Array, eps: float = 1e-12) -> Array:
    """x / max(‖x‖₂, eps) over the last axis (as torch's F.normalize)."""
    x = _acc(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def semantic_coherence(p: Array, rows: Array, window: int, causal: bool) -> Array:
    """Semantic coherence: cos((p_i − p_k)·sim_ik) averaged over a band of positions k.

    p ``[B, T, D]``; rows ``[B, T, R]`` the L2-normalised similarity rows of the tokens
    (sim_ik = rows_i · rows_k). Faithful: k ∈ [i−W, i+W], averaged over (b, k, d), so one
    value per position shared by the batch. Causal: k ∈ [i−W, i], averaged per sample.
    Out-of-range k are skipped; a window of one token gives 1. -> ``[B, T, 1]``.
    """
    p = _acc(p)
    n = p.shape[1]
    t = jnp.arange(n)
    offsets = range(-window, 1) if causal else range(-window, window + 1)
    total = jnp.zeros(p.shape[:2], p.dtype)
    count = jnp.zeros((n,), p.dtype)
    for o in offsets:
        valid = ((t + o >= 0) & (t + o < n)).astype(p.dtype)
        sim = jnp.sum(rows * shift(rows, o), axis=-1)  # [B, T]
        cos = jnp.mean(jnp.cos((p - shift(p, o)) * sim[..., None]), axis=-1)
        total = total + cos * valid[None]
        count = count + valid
    if causal:
        sem = total / count[None]
    else:
        sem = jnp.broadcast_to(jnp.mean(total, axis=0, keepdims=True) / count[None], total.shape)
    return sem[..., None]


def context_coherence(e: Array, width: int, causal: bool) -> Array:
    """cos(e_i − m_i), m_i the mean of e over [i−c, i+c] (faithful) or [i−c, i] (causal),
    clipped to the sequence. e ``[B, T, D]`` -> ``[B, T, D]``."""
    e = _acc(e)
    total, count = window_sum(e, -width, 0 if causal else width)
    return jnp.cos(e - total / count[None, :, None])


def local_coherence(e: Array, causal: bool) -> Array:
    """cos(e_{t+1} − e_t) with 0 at the last position (faithful, reads token t+1), or
    cos(e_t − e_{t−1}) with 0 at t = 0 (causal). ``[B, T, D]`` -> ``[B, T, D]``."""
    e = _acc(e)
    n = e.shape[1]
    if causal:
        diff = jnp.cos(e - shift(e, -1))
        return jnp.where((jnp.arange(n) > 0)[None, :, None], diff, 0.0)
    diff = jnp.cos(shift(e, 1) - e)
    return jnp.where((jnp.arange(n) < n - 1)[None, :, None], diff, 0.0)


# ------------------------------------------------------------------ dynamic processor


def processor_levels(dim: int, max_dim: int) -> int:
    """⌊log₁.₅(max_dim / D)⌋ expand levels (0 when D >= max_dim)."""
    if dim >= max_dim:
        return 0
    return math.floor(math.log(max_dim / dim, PROCESSOR_GROWTH))


def processor_widths(dim: int, max_dim: int) -> tuple[int, ...]:
    """d_ℓ = ⌊D·1.5^ℓ⌋ for ℓ = 1 … levels."""
    return tuple(
        int(dim * PROCESSOR_GROWTH**i) for i in range(1, processor_levels(dim, max_dim) + 1)
    )


def tile_features(x: Array, width: int) -> Array:
    """Repeat x along features ⌊width/D⌋ times, then append its first width mod D features."""
    d = x.shape[-1]
    reps, rest = divmod(width, d)
    return jnp.concatenate([x] * reps + ([x[..., :rest]] if rest else []), axis=-1)


def level_from_kappa(kappa: Array, levels: int) -> Array:
    """Branch index: 0 if κ < 0.1, else min(⌊log₁.₅(10κ)⌋, levels). int32, κ's shape."""
    k = _acc(kappa)
    raw = jnp.floor(jnp.log(jnp.maximum(10.0 * k, 1.0)) / math.log(PROCESSOR_GROWTH))
    level = jnp.minimum(raw, levels).astype(jnp.int32)
    return jnp.where(k < 0.1, 0, level)


def batch_kappa(x: Array) -> Array:
    """κ = mean over the batch of the unbiased variance over (T, D): ``[B, T, D]`` -> ``[]``."""
    x = _acc(x)
    flat = x.reshape(x.shape[0], -1)
    return jnp.mean(jnp.var(flat, axis=-1, ddof=1))


def causal_kappa(x: Array) -> Array:
    """Per-sample running κ: unbiased variance over positions <= t and all D.

    ``[B, T, D]`` -> ``[B, T]``. Centred on the first position's mean before the running
    sums, so the one-pass variance does not cancel catastrophically.
    """
    x = _acc(x)
    d = x.shape[-1]
    centred = x - jnp.mean(x[:, :1], axis=-1, keepdims=True)
    s1 = jnp.cumsum(jnp.sum(centred, -1), axis=1)
    s2 = jnp.cumsum(jnp.sum(centred * centred, -1), axis=1)
    n = d * jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[None]
    return jnp.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1.0)


# ------------------------------------------------------------------ evolve


def evolve_quantum_state(
    e: Array,
    step: Array,
    uncertainty: Array,
    noise: Array,
    mix: Array,
    uniform: Array,
    causal: bool,
) -> Array:
    """The training-only "evolve" step (spec §A3 step 7) with explicit random draws.

    e ``[B, T, D]``; step scalar; uncertainty the learnable scalar; noise ``[B, T, D]``
    N(0,1); mix ``[T, T]`` N(0,1); uniform scalar U(0,1). M = I + 0.1·ε_f·mix (lower
    triangular when causal); e ← e + 0.1·M·e along T; tanh if uniform < σ(step/200);
    plus noise·uncertainty·min(0.5, step/1000).
    """
    step = jnp.asarray(step, e.dtype)
    u = jnp.minimum(0.5, step / 1000.0)
    strength = 0.3 + 0.4 * jax.nn.sigmoid(step / 500.0)
    n = e.shape[1]
    if n > 1:
        m = jnp.eye(n, dtype=e.dtype) + mix.astype(e.dtype) * strength * 0.1
        if causal:
            m = jnp.tril(m)
        e = e + 0.1 * jnp.einsum("ts,bsd->btd", m, e)
    collapse = uniform < jax.nn.sigmoid(step / 200.0)
    e = jnp.where(collapse, jnp.tanh(e), e)
    return e + noise.astype(e.dtype) * uncertainty * u


# ------------------------------------------------------------------ phase representation


def phase_representation(q: Array, semantic_projected: Array) -> tuple[Array, Array]:
    """amplitude = tanh(q), phase = 2π·σ(q) + 0.1·W_pp·S[x] (both ``[B, T, D]``).

    The original returns amplitude·e^{i·phase} as complex64; the pair is kept real here.
    """
    q = _acc(q)
    return jnp.tanh(q), 2.0 * math.pi * jax.nn.sigmoid(q) + 0.1 * _acc(semantic_projected)
