"""Matrix-state phase-associative backbone (``type='phase_matrix'``), optionally hybrid.

A pre-norm residual stack like the oscillatory SSM's (h <- h + s_l·Layer_l(LN_l(h)), then a
final LN) whose layers are

* ``MatrixStateLayer``: complex q, k, v per head, a per-head input-dependent decay γ_t and
  the matrix memory S_t = γ_t·S_{t-1} + v_t k_t^H, read y_t = S_t q_t
  (``qpf.ops.matrix_state``: chunked parallel form in training, the recurrence for single
  steps, exact state carry between calls);
* ``LocalAttentionLayer`` (every ``local_attention_every``-th layer when > 0): multi-head
  windowed causal attention over the last W positions (self included), scores
  Re(q^H k)/sqrt(2·head_dim) of the complex heads, with a rolling key/value cache for
  decoding (``qpf.ops.attention.windowed_attention``, rule 'local').

Decoding state (``MatrixStateBackbone.init_state``), a dict:
  'matrix': ``[Lm, B, H, 2, Dh, Dh]`` float32 memories of the Lm matrix layers;
  'attention': {'keys', 'values'} ``[La, B, H, 2W, 2·Dh]`` caches of the La attention
    layers (absent when there are none); the row axis is separate from the heads so that
    beam search and row gathers (``qpf.generation.core.take_rows``) find it;
  'pos': int32 scalar, steps this backbone has consumed (positions of the attention keys).

Document resets (``segment_ids [B, T]``, full forwards): every matrix memory restarts from
zero at a document start and local attention sees only keys of the same document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.core import PhaseModule, normal_002
from qpf.ops import phase2d as p2d
from qpf.ops.attention import windowed_attention
from qpf.ops.matrix_state import matrix_state_chunked, matrix_state_recurrent
from qpf.ops.segments import segment_starts

Array = jax.Array
State = dict
_NORM_EPS = 1e-6


def _heads(x: Array, h: int) -> Array:
    """``[B, T, 2, H·D]`` -> ``[B, T, H, 2, D]``."""
    b, t, _, hd = x.shape
    return jnp.moveaxis(x.reshape(b, t, 2, h, hd // h), 2, 3)


def _unheads(y: Array) -> Array:
    """``[B, T, H, 2, D]`` -> ``[B, T, 2, H·D]``."""
    b, t, h, _, d = y.shape
    return jnp.moveaxis(y, 3, 2).reshape(b, t, 2, h * d)


def _unit(x: Array) -> Array:
    """Scale each head's complex vector ``[..., 2, D]`` to unit norm (computed in float32)."""
    x32 = x.astype(jnp.float32)
    n = jnp.sqrt(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True) + _NORM_EPS)
    return (x32 / n).astype(x.dtype)


class MatrixStateLayer(PhaseModule):
    """One phase-associative layer; x ``[B, T, 2, d]``, s0 ``[B, H, 2, Dh, Dh]`` float32
    -> (y ``[B, T, 2, d]``, S_T ``[B, H, 2, Dh, Dh]`` float32).

    q, k, v: complex linear maps to H heads of Dh. log γ_t = −softplus(W·[Re x, Im x] + b)
    per head (a gate that reads the real and imaginary parts, not only |x|), b initialised
    to ``gate_bias_init``. y: heads concatenated, then a complex linear map back to d, and
    phase-preserving dropout (one mask per complex channel).
    """

    cfg: cfgs.MatrixStateConfig = cfgs.MatrixStateConfig()

    @nn.compact
    def __call__(
        self,
        x: Array,
        s0: Array,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Array]:
        c, d = self.cfg, x.shape[-1]
        resets = None if segment_ids is None else segment_starts(segment_ids)
        h, dh = c.num_heads, c.head_dim
        q = _heads(self.linear(h * dh, "query")(x), h)
        k = _heads(self.linear(h * dh, "key")(x), h)
        v = _heads(self.linear(h * dh, "value")(x), h)
        if c.qk_norm:
            q, k = _unit(q), _unit(k)
        else:
            q = q * jnp.asarray(dh**-0.5, q.dtype)
        decay = nn.Dense(
            h,
            kernel_init=normal_002,
            bias_init=nn.initializers.constant(c.gate_bias_init),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="decay_proj",
        )(p2d.to_concat(x))
        log_gamma = -jax.nn.softplus(decay.astype(jnp.float32))  # [B, T, H], ≤ 0
        if c.form == "recurrent" or x.shape[1] == 1:
            y, s = matrix_state_recurrent(q, k, v, log_gamma, s0, unroll=c.unroll, resets=resets)
        else:
            y, s = matrix_state_chunked(
                q, k, v, log_gamma, s0, chunk_size=c.chunk_size, resets=resets
            )
        y = self.linear(d, "output")(_unheads(y).astype(x.dtype))
        y = nn.Dropout(c.dropout, broadcast_dims=(y.ndim - 2,), name="dropout")(
            y, deterministic=deterministic
        )
        return y, s


class LocalAttentionLayer(PhaseModule):
    """Multi-head windowed causal attention on complex heads (the hybrid's attention layer).

    Query t sees keys t−W+1 .. t (W = ``local_attention_window``). Each head's complex
    q, k, v ``[2, Dh]`` are flattened to real ``[2·Dh]`` ([re, im]), so the score is
    Re(q^H k)/sqrt(2·Dh): phase-aligned keys score high. ``cache`` holds the keys and
    values of the previous 2W positions ``[B, H, 2W, 2·Dh]`` (None: nothing before
    ``start``), ``start`` the absolute position of x's first step.

    x ``[B, T, 2, d]`` -> (y ``[B, T, 2, d]``, new cache, same dtypes as ``cache``).
    """

    cfg: cfgs.MatrixStateConfig = cfgs.MatrixStateConfig()

    @nn.compact
    def __call__(
        self,
        x: Array,
        cache: dict[str, Array] | None = None,
        deterministic: bool = True,
        start: Array | int = 0,
        segment_ids: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        c, d = self.cfg, x.shape[-1]
        b, t = x.shape[:2]
        h, dh = c.num_heads, c.head_dim

        def flat(name: str) -> Array:  # [B, T, 2, H·Dh] -> [B·H, T, 2·Dh]
            z = _heads(self.linear(h * dh, name)(x), h)  # [B, T, H, 2, Dh]
            return jnp.moveaxis(z, 2, 1).reshape(b * h, t, 2 * dh)

        q, k, v = flat("query"), flat("key"), flat("value")
        history = None
        if cache is not None:  # [B, H, 2W, 2·Dh] -> [B·H, 2W, 2·Dh]
            history = tuple(
                cache[n].reshape(b * h, *cache[n].shape[2:]) for n in ("keys", "values")
            )
        seg = None if segment_ids is None else jnp.repeat(segment_ids, h, axis=0)  # [B·H, T]
        out, (keys, values) = windowed_attention(
            q,
            k,
            v,
            start,
            window=c.local_attention_window,
            rule="local",
            history=history,
            segment_ids=seg,
        )
        y = jnp.moveaxis(out.reshape(b, h, t, 2, dh), 1, 2)  # [B, T, H, 2, Dh]
        y = self.linear(d, "output")(_unheads(y).astype(x.dtype))
        y = nn.Dropout(c.dropout, broadcast_dims=(y.ndim - 2,), name="dropout")(
            y, deterministic=deterministic
        )
        dt = k.dtype if cache is None else cache["keys"].dtype
        new = {"keys": keys, "values": values}
        return y, {n: a.reshape(b, h, *a.shape[1:]).astype(dt) for n, a in new.items()}


class MatrixStateBackbone(PhaseModule):
    """Stack: h <- h + s_l·Layer_l(LN_l(h)) (s_l = ``layer_scales[l]``, init
    ``layer_scale_init``), then a final LN; layer l is local attention when
    ``cfg.is_attention_layer(l)``, else a ``MatrixStateLayer``.

    x ``[B, T, 2, d]``, state (``init_state``; None = fresh at position 0) ->
    (y ``[B, T, 2, d]``, new state, exact: running a sequence in pieces equals one pass).
    """

    cfg: cfgs.MatrixStateConfig = cfgs.MatrixStateConfig()

    @staticmethod
    def init_state(
        cfg: cfgs.MatrixStateConfig, batch: int, dtype=jnp.float32, dim: int | None = None
    ) -> State:
        """The empty state at position 0. The memories are float32 whatever ``dtype``;
        the attention caches use ``dtype`` (float32 holds bf16 keys exactly)."""
        n_att = sum(cfg.is_attention_layer(i) for i in range(cfg.num_layers))
        h, dh = cfg.num_heads, cfg.head_dim
        state: State = {
            "matrix": jnp.zeros((cfg.num_layers - n_att, batch, h, 2, dh, dh), jnp.float32),
            "pos": jnp.zeros((), jnp.int32),
        }
        if n_att:
            shape = (n_att, batch, h, 2 * cfg.local_attention_window, 2 * dh)
            zeros = jnp.zeros(shape, dtype)
            state["attention"] = {"keys": zeros, "values": zeros}
        return state

    @nn.compact
    def __call__(
        self,
        x: Array,
        state: State | None = None,
        *,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> tuple[Array, State]:
        c = self.cfg
        if state is None:
            state = self.init_state(c, x.shape[0], p2d.acc_dtype(x.dtype))
        scales = self.param(
            "layer_scales",
            nn.initializers.constant(c.layer_scale_init),
            (c.num_layers,),
            self.param_dtype,
        )
        # static_argnums counts self: (self, x, state, deterministic).
        remat = (lambda m: nn.remat(m, static_argnums=(3,))) if c.remat else (lambda m: m)
        kw = {"cfg": c, "dtype": self.dtype, "param_dtype": self.param_dtype}
        h, memories, keys, values = x, [], [], []
        for i in range(c.num_layers):
            u = self.norm(f"norms_{i}")(h)
            if c.is_attention_layer(i):
                cache = {n: a[len(keys)] for n, a in state["attention"].items()}
                # At position 0 the zero cache sits at negative positions: masked.
                layer = LocalAttentionLayer(**kw, name=f"layers_{i}")
                y, new = layer(u, cache, deterministic, state["pos"], segment_ids)
                keys.append(new["keys"])
                values.append(new["values"])
            else:
                layer = remat(MatrixStateLayer)(**kw, name=f"layers_{i}")
                y, s = layer(u, state["matrix"][len(memories)], deterministic, segment_ids)
                memories.append(s)
            h = h + (scales[i] * y).astype(h.dtype)
        new_state: State = {
            "matrix": jnp.stack(memories) if memories else state["matrix"],
            "pos": state["pos"] + x.shape[1],
        }
        if keys:
            new_state["attention"] = {"keys": jnp.stack(keys), "values": jnp.stack(values)}
        return self.norm("output_norm")(h), new_state


def memories_as_planes(state: State) -> Array | None:
    """The matrix memories ``[Lm, B, H, 2, Dh, Dh]`` as ``[Lm, B, 2, H·Dh·Dh]`` (the
    ``[..., 2, N]`` layout of SSM-state diagnostics), or None with no matrix layer."""
    m = state["matrix"]
    if m.shape[0] == 0:
        return None
    return jnp.moveaxis(m, 3, 2).reshape(m.shape[0], m.shape[1], 2, -1)
