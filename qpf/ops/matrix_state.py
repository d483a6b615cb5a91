"""Matrix-state phase-associative recurrence: S_t = γ_t·S_{t-1} + v_t k_t^H, y_t = S_t q_t.

Per batch row and head, q_t, k_t ∈ C^{Dk}, v_t ∈ C^{Dv} and a real decay γ_t ∈ (0, 1];
the state S_t ∈ C^{Dv×Dk} is an associative memory of (key, value) pairs whose read
y_t = S_t q_t = Σ_{s≤t} (Π_{s<r≤t} γ_r)·(k_s^H q_t)·v_s (+ the decayed initial state) weighs
each stored value by the complex overlap of its key with the query: phase alignment, not
only magnitude, decides what is recalled.

Complex tensors are real pairs on axis -2 (``qpf.ops.phase2d``): q, k ``[B, T, H, 2, Dk]``,
v ``[B, T, H, 2, Dv]``, state ``[B, H, 2, Dv, Dk]`` (float32 always). Decays are given as
``log_gamma [B, T, H]`` (≤ 0, float32) so products of many γ stay exact as sums of logs.

Two forms with identical results:

* ``matrix_state_recurrent``: ``lax.scan`` over time, one rank-1 update per step (the
  reference, and the decoding step);
* ``matrix_state_chunked``: the training form. The sequence is cut into chunks of C; within
  a chunk the output is an attention-like masked product with weights
  exp(L_t − L_s)·(k_s^H q_t), L the within-chunk cumulative log-decay (float32, s ≤ t so
  every exponent is ≤ 0 and nothing overflows); across chunks only the state is carried,
  by a scan over T/C steps. T need not be a multiple of C: the tail is padded with
  k = v = q = 0 and log γ = 0, which leaves both outputs and the state unchanged.

Document resets (``resets`` bool ``[B, T]``, ``qpf.ops.segments``): at a reset the state
carried in is zero, S_t = v_t k_t^H (γ_t = 0); the chunked form masks the within-chunk
weights across a reset and the state across the chunks instead of taking log 0.

Matrix products run in the inputs' dtype with float32 accumulation; decays, the state and
every product with the state are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32


def _parts(x: Array) -> tuple[Array, Array]:
    return x[..., 0, :], x[..., 1, :]


def _check(q: Array, k: Array, v: Array, log_gamma: Array, s0: Array | None) -> None:
    b, t, h, two, dk = q.shape
    if two != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, 2, Dk]; got {q.shape} and {k.shape}")
    if v.shape[:4] != (b, t, h, 2):
        raise ValueError(f"v must be [B, T, H, 2, Dv] matching q {q.shape}; got {v.shape}")
    if log_gamma.shape != (b, t, h):
        raise ValueError(f"log_gamma must be [B, T, H] = {(b, t, h)}; got {log_gamma.shape}")
    if s0 is not None and s0.shape != (b, h, 2, v.shape[-1], dk):
        raise ValueError(
            f"initial state must be [B, H, 2, Dv, Dk] = {(b, h, 2, v.shape[-1], dk)}; "
            f"got {s0.shape}"
        )


def zero_state(batch: int, heads: int, dv: int, dk: int) -> Array:
    """The empty memory ``[B, H, 2, Dv, Dk]`` float32."""
    return jnp.zeros((batch, heads, 2, dv, dk), F32)


def _read(s: Array, q: Array) -> Array:
    """y = S q for state ``[..., 2, Dv, Dk]`` and queries ``[..., 2, Dk]`` -> ``[..., 2, Dv]``."""
    sr, si = s[..., 0, :, :], s[..., 1, :, :]
    qr, qi = _parts(q.astype(F32))
    mv = lambda m, x: jnp.einsum("...ij,...j->...i", m, x)  # noqa: E731
    return jnp.stack([mv(sr, qr) - mv(si, qi), mv(sr, qi) + mv(si, qr)], axis=-2)


def matrix_state_recurrent(
    q: Array,
    k: Array,
    v: Array,
    log_gamma: Array,
    s0: Array | None = None,
    *,
    unroll: int = 1,
    resets: Array | None = None,
) -> tuple[Array, Array]:
    """The exact step-by-step recurrence (reference and decoding form).

    Args:
      q, k: ``[B, T, H, 2, Dk]``; v: ``[B, T, H, 2, Dv]``; log_gamma: ``[B, T, H]`` (≤ 0);
      s0: ``[B, H, 2, Dv, Dk]`` float32 initial state (zeros if None).
      unroll: ``lax.scan`` unroll.
      resets: bool ``[B, T]`` document starts (zero state carried in), or None.

    Returns:
      (y ``[B, T, H, 2, Dv]`` in q's dtype, S_T ``[B, H, 2, Dv, Dk]`` float32).
    """
    _check(q, k, v, log_gamma, s0)
    b, _, h, _, dk = q.shape
    dv = v.shape[-1]
    s0 = zero_state(b, h, dv, dk) if s0 is None else s0.astype(F32)

    if resets is None:
        resets = jnp.zeros(q.shape[:2], bool)

    def step(s, inp):
        qt, kt, vt, lg, rt = inp  # [B, H, 2, D], [B, H], [B]
        kr, ki = _parts(kt.astype(F32))
        vr, vi = _parts(vt.astype(F32))
        outer = lambda a, c: a[..., :, None] * c[..., None, :]  # noqa: E731
        # v k^H = (vr + i vi)(kr − i ki)^T.
        upd = jnp.stack([outer(vr, kr) + outer(vi, ki), outer(vi, kr) - outer(vr, ki)], axis=-3)
        keep = jnp.where(rt[:, None], 0.0, jnp.exp(lg.astype(F32)))  # γ_t, 0 at a reset
        s = keep[..., None, None, None] * s + upd
        return s, _read(s, qt)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, log_gamma, resets))
    s_last, ys = jax.lax.scan(step, s0, xs, unroll=unroll)
    return jnp.moveaxis(ys, 0, 1).astype(q.dtype), s_last


def matrix_state_chunked(
    q: Array,
    k: Array,
    v: Array,
    log_gamma: Array,
    s0: Array | None = None,
    *,
    chunk_size: int = 64,
    resets: Array | None = None,
) -> tuple[Array, Array]:
    """The chunked parallel form; same arguments and results as ``matrix_state_recurrent``.

    With ``resets``, r_t counts the resets of a chunk up to t: the weight of s for t is
    kept only when r_s = r_t, the carried state is read only while r_t = 0, a chunk hands
    on only the steps after its last reset, and the carry into it only without a reset.

    Per chunk of C steps (n indexes chunks, t and s steps within one):
      L_t = Σ_{r≤t} log γ_r,
      y_t = Σ_{s≤t} exp(L_t − L_s)·(k_s^H q_t)·v_s + exp(L_t)·S_n q_t,
      S_{n+1} = exp(L_C)·S_n + Σ_s exp(L_C − L_s)·v_s k_s^H.
    Cost O(T·C·D + T·D²) with T/C sequential state steps.
    """
    _check(q, k, v, log_gamma, s0)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    b, t, h, _, dk = q.shape
    dv = v.shape[-1]
    s0 = zero_state(b, h, dv, dk) if s0 is None else s0.astype(F32)
    c = chunk_size
    pad = (-t) % c
    n = (t + pad) // c
    cd = q.dtype  # compute dtype of the q·k and A·v products (float32 accumulation)

    def chunks(x: Array) -> Array:  # [B, T, ...] -> [B, N, C, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n, c, *x.shape[2:])

    qc, kc, vc = chunks(q), chunks(k.astype(cd)), chunks(v.astype(cd))  # [B, N, C, H, 2, D]
    lg = chunks(log_gamma.astype(F32))  # [B, N, C, H]; padded steps have γ = 1
    cum = jnp.cumsum(lg, axis=2)  # L_t within each chunk
    total = cum[:, :, -1]  # [B, N, H]

    # Within-chunk scores k_s^H q_t = Σ_j conj(k_sj) q_tj as two real products of the
    # concatenated [re, im] layouts: re = [qr, qi]·[kr, ki], im = [qi, −qr]·[kr, ki].
    qr, qi = _parts(qc)
    k_cat = kc.reshape(*kc.shape[:-2], 2 * dk)
    q_re = jnp.concatenate([qr, qi], axis=-1)
    q_im = jnp.concatenate([qi, -qr], axis=-1)
    ein = lambda eq, a, c_: jnp.einsum(eq, a, c_, preferred_element_type=F32)  # noqa: E731
    score_re = ein("bntha,bnsha->bnhts", q_re, k_cat)  # [B, N, H, C, C]
    score_im = ein("bntha,bnsha->bnhts", q_im, k_cat)
    cum_h = jnp.moveaxis(cum, 3, 2)  # [B, N, H, C]
    diff = cum_h[..., :, None] - cum_h[..., None, :]  # L_t − L_s
    causal = jnp.tril(jnp.ones((c, c), bool))
    if resets is not None:  # r_t: resets so far in the chunk
        r = jnp.cumsum(chunks(resets.astype(jnp.int32)), axis=2)  # [B, N, C]
        causal = causal & (r[:, :, None, :, None] == r[:, :, None, None, :])  # [B,N,1,C,C]
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    a_re = (decay * score_re).astype(cd)
    a_im = (decay * score_im).astype(cd)
    vr, vi = _parts(vc)  # [B, N, C, H, Dv]
    av = lambda a, x: ein("bnhts,bnshd->bnthd", a, x)  # noqa: E731
    y_intra = jnp.stack([av(a_re, vr) - av(a_im, vi), av(a_re, vi) + av(a_im, vr)], axis=-2)

    # Each chunk's own contribution to the state it hands on: Σ_s exp(L_C − L_s)·v_s k_s^H.
    w = jnp.exp(total[:, :, None, :] - cum)  # [B, N, C, H], ≤ 1
    if resets is not None:  # only the steps after the chunk's last reset reach its end
        w = jnp.where((r == r[:, :, -1:])[..., None], w, 0.0)
        total_keep = jnp.where((r[:, :, -1] == 0)[..., None], jnp.exp(total), 0.0)
    else:
        total_keep = jnp.exp(total)
    kr, ki = _parts(kc.astype(F32))
    vr32, vi32 = vr.astype(F32) * w[..., None], vi.astype(F32) * w[..., None]
    outer = lambda a, c_: jnp.einsum("bnshi,bnshj->bnhij", a, c_)  # noqa: E731
    delta = jnp.stack(
        [outer(vr32, kr) + outer(vi32, ki), outer(vi32, kr) - outer(vr32, ki)], axis=3
    )  # [B, N, H, 2, Dv, Dk]

    def carry(s, inp):
        keep, d = inp  # [B, H] (exp of the chunk's total log-decay), [B, H, 2, Dv, Dk]
        return keep[..., None, None, None] * s + d, s

    xs = (jnp.moveaxis(total_keep, 1, 0), jnp.moveaxis(delta, 1, 0))
    s_last, s_in = jax.lax.scan(carry, s0, xs)
    s_in = jnp.moveaxis(s_in, 0, 1)  # [B, N, H, 2, Dv, Dk]: the state entering each chunk
    # Inter-chunk read exp(L_t)·S_n q_t (float32: the state is never rounded).
    read_w = jnp.exp(cum) if resets is None else jnp.where((r == 0)[..., None], jnp.exp(cum), 0.0)
    y_inter = _read(s_in[:, :, None], qc) * read_w[..., None, None]
    y = (y_intra + y_inter).reshape(b, n * c, h, 2, dv)[:, :t]
    return y.astype(q.dtype), s_last
