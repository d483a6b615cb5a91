"""Diagonal linear recurrences h_t = a_t ⊙ h_{t-1} + b_t, with interchangeable backends.

``linear_scan`` is the one engine: every backend takes the same arguments, accumulates in
float32 (float64 under x64), takes an initial state and returns ``(h, h_last)`` where
``h_last`` is the state after exactly T steps, for every T (padding steps, where a backend
needs them, use a = 1 and b = 0 so they leave the state unchanged).

``oscillatory_scan`` is the single entry point the v4 SSM layer calls: it forms
a_t = (1 - σ(g_t))·δ·R and b_t = σ(g_t)·Bx_t from the gate logits, damping and Cayley skew
(spec §8.2) and runs the selected backend (``sequential``, ``associative``, ``chunked``,
``pallas``, a fused kernel, or ``auto``: chosen by platform).

The Pallas kernel lives in the top-level ``kernels`` package, which depends on qpf and
never the reverse: importing ``kernels`` registers it here (``register_scan_backend``).
``auto`` resolves at trace time: ``pallas`` on GPU when registered, else ``chunked`` on
accelerators and ``sequential`` on CPU.

Document resets (``resets`` bool ``[B, T]``, see ``qpf.ops.segments``): a reset at t makes
the state carried into t zero, h_t = b_t, by zeroing a_t there; every backend runs the same
(a, b) so they all honour it. The fused Pallas kernel has no reset input: with resets,
``oscillatory_scan`` runs the chunked backend instead (same result, no fused kernel).

Complex values are Phase2D real pairs ``[B, T, 2, N]`` (see ``qpf.ops.phase2d``); a real
recurrence ``[B, T, N]`` is the same code with ``complex_pairs=False``.

Backend guidance (measured on CPU in ``experiments/benchmark_scan.py``): ``sequential`` with
``unroll=1`` is fastest on CPU; ``chunked`` bounds memory and parallelises on accelerators;
``associative`` has log-depth but ~3x the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from qpf.ops import phase2d as p2d

Array = jax.Array
ScanType = Literal["sequential", "associative", "chunked", "pallas", "auto"]
SCAN_TYPES: tuple[str, ...] = get_args(ScanType)

# Fused oscillatory-scan kernels by name, filled by the packages that define them:
# fn(gate_logits, bx, damping_logit, skew, h0) -> (h, h_last), as ``oscillatory_scan``.
SCAN_BACKENDS: dict[str, Callable[..., tuple[Array, Array]]] = {}


def register_scan_backend(name: str, fn: Callable[..., tuple[Array, Array]]) -> None:
    """Make ``fn`` the oscillatory scan selected by ``scan_type=name`` (``kernels`` calls this)."""
    SCAN_BACKENDS[name] = fn


def resolve_scan_type(scan_type: str, platform: str | None = None, fused: bool = True) -> str:
    """``auto`` -> the backend for ``platform`` (default: JAX's default backend).

    fused: whether a registered fused kernel may be chosen (only ``oscillatory_scan`` has
    one; ``linear_scan`` passes False).
    """
    if scan_type != "auto":
        return scan_type
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "sequential"
    return "pallas" if fused and platform == "gpu" and "pallas" in SCAN_BACKENDS else "chunked"


# A pair (re, im) of [B, T, N] arrays, or a single real [B, T, N] array in a 1-tuple.
_Parts = tuple[Array, ...]


def _to_parts(x: Array, complex_pairs: bool) -> _Parts:
    return p2d.split(x) if complex_pairs else (x,)


def _from_parts(parts: _Parts, complex_pairs: bool) -> Array:
    return p2d.join(*parts) if complex_pairs else parts[0]


def _mul(x: _Parts, y: _Parts) -> _Parts:
    if len(x) == 1:
        return (x[0] * y[0],)
    xr, xi = x
    yr, yi = y
    return (xr * yr - xi * yi, xr * yi + xi * yr)


def _add(x: _Parts, y: _Parts) -> _Parts:
    return tuple(u + v for u, v in zip(x, y))


def _combine(first: tuple[_Parts, _Parts], second: tuple[_Parts, _Parts]):
    """(a1, b1) then (a2, b2) = (a2·a1, a2·b1 + b2): the associative recurrence operator."""
    a1, b1 = first
    a2, b2 = second
    return _mul(a2, a1), _add(_mul(a2, b1), b2)


def _sequential(a: _Parts, b: _Parts, h0: _Parts, unroll: int) -> tuple[_Parts, _Parts]:
    """Reference backend: lax.scan over time. Parts are [B, T, N]; h0 parts [B, N]."""

    def step(h, ab):
        a_t, b_t = ab
        h = _add(_mul(a_t, h), b_t)
        return h, h

    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (a, b))
    h_last, hs = jax.lax.scan(step, h0, time_major, unroll=unroll)
    return tuple(jnp.moveaxis(x, 0, 1) for x in hs), h_last


def _associative(a: _Parts, b: _Parts, h0: _Parts, axis: int = 1) -> tuple[_Parts, _Parts]:
    """Parallel prefix scan along ``axis``; h0 is folded into the first b."""
    first = tuple(jax.lax.index_in_dim(x, 0, axis, keepdims=True) for x in a)
    h0e = tuple(jnp.expand_dims(x, axis) for x in h0)
    b0 = _add(_mul(first, h0e), tuple(jax.lax.index_in_dim(x, 0, axis, True) for x in b))
    b = tuple(
        jax.lax.concatenate([x0, jax.lax.slice_in_dim(x, 1, None, axis=axis)], axis)
        for x0, x in zip(b0, b)
    )
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=axis)
    h_last = tuple(jax.lax.index_in_dim(x, -1, axis, keepdims=False) for x in h)
    return h, h_last


def _pad_time(parts: _Parts, pad: int, value: float) -> _Parts:
    widths = [(0, 0), (0, pad), (0, 0)]
    return tuple(jnp.pad(x, widths, constant_values=value) for x in parts)


def _chunked(a: _Parts, b: _Parts, h0: _Parts, chunk: int) -> tuple[_Parts, _Parts]:
    """Associative scan inside fixed chunks, sequential lax.scan over chunk carries.

    Memory and depth are bounded by the chunk; the carry into chunk c is corrected with the
    within-chunk cumulative products of a (the algebra of recurrentgemma's multi-shard fix).
    """
    bsz, t, n = a[0].shape
    pad = (-t) % chunk
    # Padding steps are identities (a = 1 + 0i, b = 0), so the final state stays exact.
    a = _pad_time(a[:1], pad, 1.0) + _pad_time(a[1:], pad, 0.0)
    b = _pad_time(b, pad, 0.0)
    nc = (t + pad) // chunk
    blocks = lambda p: tuple(x.reshape(bsz, nc, chunk, n) for x in p)  # noqa: E731
    a_cum, h_loc = jax.lax.associative_scan(_combine, (blocks(a), blocks(b)), axis=2)

    def carry_step(h_in, ab_last):
        a_last, h_last_loc = ab_last
        h_out = _add(_mul(a_last, h_in), h_last_loc)
        return h_out, h_in

    last = lambda p: tuple(jnp.moveaxis(x[:, :, -1], 1, 0) for x in p)  # noqa: E731
    h_last, h_ins = jax.lax.scan(carry_step, h0, (last(a_cum), last(h_loc)))
    h_ins = tuple(jnp.moveaxis(x, 0, 1)[:, :, None] for x in h_ins)  # [B, nc, 1, N]
    h = _add(h_loc, _mul(a_cum, h_ins))
    h = tuple(x.reshape(bsz, nc * chunk, n)[:, :t] for x in h)
    return h, h_last


def apply_resets(a: Array, resets: Array | None, complex_pairs: bool = True) -> Array:
    """a with a_t = 0 where ``resets`` [B, T] is True (the state carried into t is zero).

    a: ``[B, T, 2, N]`` (complex pairs) or ``[B, T, N]``; returned unchanged if resets is None.
    """
    if resets is None:
        return a
    r = resets.reshape(*resets.shape, *(1,) * (a.ndim - 2))
    return jnp.where(r, jnp.zeros((), a.dtype), a)


def linear_scan(
    a: Array,
    b: Array,
    h0: Array | None = None,
    *,
    resets: Array | None = None,
    scan_type: ScanType = "sequential",
    chunk_size: int = 128,
    unroll: int = 1,
    complex_pairs: bool = True,
    out_dtype: jnp.dtype | None = None,
) -> tuple[Array, Array]:
    """Run h_t = a_t ⊙ h_{t-1} + b_t over axis 1.

    Args:
      a, b: ``[B, T, 2, N]`` complex pairs (or ``[B, T, N]`` real with complex_pairs=False).
      h0: initial state ``[B, 2, N]`` (``[B, N]``); zeros if None.
      resets: bool ``[B, T]``, True where a document starts: the state carried into that
        step is zero (h_t = b_t). None: no resets (bit-identical to before).
      scan_type: 'sequential' (lax.scan), 'associative' (lax.associative_scan) or
        'chunked' (associative within ``chunk_size`` chunks, sequential across them).
      unroll: lax.scan unroll factor for the sequential backend.
      out_dtype: dtype of the returned h (default: b's dtype).

    Returns:
      (h ``[B, T, 2, N]`` in ``out_dtype``, h_last ``[B, 2, N]`` in the accumulation dtype).
    """
    scan_type = resolve_scan_type(scan_type, fused=False)
    if scan_type not in ("sequential", "associative", "chunked"):
        raise ValueError(
            f"linear_scan: scan_type must be one of sequential, associative, chunked; got "
            f"{scan_type!r} (the fused 'pallas' backend is reached through oscillatory_scan)"
        )
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {a.shape} and b {b.shape} must have the same shape")
    out_dtype = out_dtype or b.dtype
    acc = p2d.acc_dtype(jnp.result_type(a.dtype, b.dtype))
    state_shape = (b.shape[0], *b.shape[2:])
    h0 = jnp.zeros(state_shape, acc) if h0 is None else h0.astype(acc)
    if h0.shape != state_shape:
        raise ValueError(f"linear_scan: h0 has shape {h0.shape}, expected {state_shape}")
    if resets is not None and resets.shape != b.shape[:2]:
        raise ValueError(f"linear_scan: resets {resets.shape} must be [B, T] = {b.shape[:2]}")
    a = apply_resets(a.astype(acc), resets, complex_pairs)
    ap, bp, hp = (_to_parts(x.astype(acc), complex_pairs) for x in (a, b, h0))
    if b.shape[1] == 0:
        return b.astype(out_dtype), h0
    if scan_type == "sequential":
        h, h_last = _sequential(ap, bp, hp, unroll)
    elif scan_type == "associative":
        h, h_last = _associative(ap, bp, hp)
    else:
        h, h_last = _chunked(ap, bp, hp, chunk_size)
    return _from_parts(h, complex_pairs).astype(out_dtype), _from_parts(h_last, complex_pairs)


def damping(damping_logit: Array) -> Array:
    """δ = 0.5 + 0.5·σ(p) ∈ (0.5, 1), the per-state-dim damping of spec §8.2."""
    return 0.5 + 0.5 * jax.nn.sigmoid(damping_logit)


def oscillatory_coefficients(
    gate_logits: Array, bx: Array, damping_logit: Array, skew: Array
) -> tuple[Array, Array]:
    """a_t = (1 - g_t)·δ·(c + i s) and b_t = g_t·Bx_t with g_t = σ(gate_logits_t).

    gate_logits ``[B, T, N]``, bx ``[B, T, 2, N]``, damping_logit and skew ``[N]``.
    Computed in the accumulation dtype. Returns (a, b), both ``[B, T, 2, N]``.
    """
    acc = p2d.acc_dtype(jnp.result_type(gate_logits.dtype, bx.dtype))
    g = jax.nn.sigmoid(gate_logits.astype(acc))
    c, s = p2d.cayley(skew.astype(acc))
    decay = (1.0 - g) * damping(damping_logit.astype(acc))
    a = p2d.join(decay * c, decay * s)
    b = bx.astype(acc) * g[..., None, :]
    return a, b


def oscillatory_scan(
    gate_logits: Array,
    bx: Array,
    damping_logit: Array,
    skew: Array,
    h0: Array | None = None,
    *,
    resets: Array | None = None,
    scan_type: ScanType = "sequential",
    chunk_size: int = 128,
    unroll: int = 1,
) -> tuple[Array, Array]:
    """The v4 oscillatory recurrence h_t = σ(g_t)·Bx_t + (1-σ(g_t))·δ·R ⊙ h_{t-1}.

    The one entry point of the SSM layer; see ``linear_scan`` for backends and shapes.
    gate_logits ``[B, T, N]``, bx ``[B, T, 2, N]``, damping_logit/skew ``[N]``,
    h0 ``[B, 2, N]``, resets bool ``[B, T]`` (document starts: zero state carried in).
    Returns (h ``[B, T, 2, N]``, h_last ``[B, 2, N]``). With resets, a fused kernel
    (``pallas``, also when ``auto`` picks it) is replaced by the ``chunked`` backend.
    """
    scan_type = resolve_scan_type(scan_type)
    if resets is not None and (scan_type in SCAN_BACKENDS or scan_type == "pallas"):
        scan_type = "chunked"  # the fused kernels take no resets
    if scan_type in SCAN_BACKENDS:
        return SCAN_BACKENDS[scan_type](gate_logits, bx, damping_logit, skew, h0)
    if scan_type == "pallas":
        raise ValueError(
            "scan_type 'pallas' needs the kernels package: `import kernels` registers it"
        )
    a, b = oscillatory_coefficients(gate_logits, bx, damping_logit, skew)
    return linear_scan(
        a,
        b,
        h0,
        resets=resets,
        scan_type=scan_type,
        chunk_size=chunk_size,
        unroll=unroll,
        out_dtype=bx.dtype,
    )
