"""Memories: the global phase-associative memory (spec §9) and episodic attention (§10)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.core import PhaseModule, complex_table
from qpf.ops import phase2d as p2d
from qpf.ops.attention import windowed_attention
from qpf.ops.retrieval import topk_read
from qpf.registry import Registry

Array = jax.Array


class PhaseAssociativeMemory(PhaseModule):
    """Learned complex key/value slots read by top-k cosine attention.

    q = query_proj(x); the k slots with the best cosine score are mixed by a softmax over
    those scores (no temperature, as the original); out = output_proj(output_norm(mix)).
    The slot scan is chunked (``key_chunk_size``), so the [tokens, slots] score matrix is
    never built for large slot counts. x ``[B, T, 2, d]`` -> (out ``[B, T, 2, d]``,
    {'indices', 'weights'} ``[B, T, k]``).
    """

    cfg: cfgs.MemoryConfig = cfgs.MemoryConfig()

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        c, d = self.cfg, x.shape[-1]
        keys = complex_table(self, "key_table", c.num_slots, d, self.param_dtype)
        values = complex_table(self, "value_table", c.num_slots, d, self.param_dtype)
        q = self.linear(d, "query_proj")(x)
        acc = p2d.acc_dtype(q.dtype)
        flat = p2d.to_concat(q).reshape(-1, 2 * d).astype(acc)
        mixed, weights, idx = topk_read(
            flat,
            p2d.to_concat(keys).astype(acc),
            p2d.to_concat(values),
            c.top_k,
            c.key_chunk_size,
        )
        mixed = p2d.from_concat(mixed.reshape(*x.shape[:-2], 2 * d)).astype(x.dtype)
        out = self.linear(d, "output_proj")(self.norm("output_norm")(mixed))
        lead = x.shape[:-2]
        return out, {"indices": idx.reshape(*lead, -1), "weights": weights.reshape(*lead, -1)}


class EpisodicMemory(PhaseModule):
    """Single-head windowed causal attention over the hidden states (spec §10).

    q, k, v are bias-free real projections of the concat layout (width 2d); the scale is
    1/sqrt(2d); there is no output projection. The visibility rule comes from the regime
    (see ``EpisodicConfig``). State: the last 2·window keys and values ``[B, 2W, 2d]``.
    s ``[B, T, 2, d]`` -> (values ``[B, T, 2, d]`` before the fixed weight, new state).
    segment_ids ``[B, T]`` (optional; regimes 'chunked' and 'sliding'): a query sees only
    its own document's keys, with the rule on positions counted from the document's start.
    """

    cfg: cfgs.EpisodicConfig = cfgs.EpisodicConfig()

    @staticmethod
    def init_state(cfg: cfgs.EpisodicConfig, batch: int, dim: int, dtype) -> dict[str, Array]:
        shape = (batch, 2 * cfg.window, 2 * dim)
        return {"keys": jnp.zeros(shape, dtype), "values": jnp.zeros(shape, dtype)}

    @nn.compact
    def __call__(
        self,
        s: Array,
        state: dict[str, Array] | None,
        start: Array | int,
        segment_ids: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        d2 = 2 * s.shape[-1]
        x = p2d.to_concat(s)
        q, k, v = (
            self.real_linear(d2, f"{n}_proj", use_bias=False)(x) for n in ("query", "key", "value")
        )
        rule = self._rule(s.shape[1], state)
        if segment_ids is not None and self.cfg.regime == "original":
            raise ValueError(
                "episodic regime 'original' picks its rule by the window length, so a packed "
                "document cannot see what it sees alone: use regime 'chunked' or 'sliding'"
            )
        history = None if state is None else (state["keys"], state["values"])
        out, (hk, hv) = windowed_attention(
            q,
            k,
            v,
            start,
            window=self.cfg.window,
            rule=rule,
            history=history,
            segment_ids=segment_ids,
        )
        if rule == "causal":  # the original overwrites row 0 on its short path
            out = out.at[:, 0].set(0.0)
        return p2d.from_concat(out), {"keys": hk, "values": hv}

    def _rule(self, t: int, state) -> str:
        regime = self.cfg.regime
        if regime != "original":
            return regime
        if state is not None:
            raise ValueError(
                "episodic regime 'original' switches rule with the total sequence length, so "
                "it cannot be streamed or decoded incrementally; use regime='chunked' (what "
                "the original computes for T > 2·window) or 'sliding'"
            )
        return "causal" if t <= 2 * self.cfg.window else "chunked"


# The model looks the global memory up by its config's ``type`` (episodic memory is fixed).
MEMORIES: Registry = Registry.of("memory", {"phase_associative": PhaseAssociativeMemory})
