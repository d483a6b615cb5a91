"""Oscillatory SSM backbone (spec §8): a pre-norm residual stack of damped-rotation layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.core import PhaseModule, scaled_normal
from qpf.ops import phase2d as p2d
from qpf.ops.scan import oscillatory_scan
from qpf.registry import BACKBONES

Array = jax.Array


class OscillatorySSMLayer(PhaseModule):
    """One layer: h_t = g_t·Bx_t + (1 - g_t)·δ·R ⊙ h_{t-1}, y_t = C h_t + D x_t.

    g_t = σ(gate_proj(concat(x_t))) is real and depends on the input only, so the whole
    sequence of coefficients is known up front and the recurrence runs through
    ``oscillatory_scan`` with the configured backend. δ = 0.5 + 0.5σ(damping),
    R = Cayley(skew). In training, a phase-preserving dropout mask ``[B, T, d]`` is shared by
    the real and imaginary parts.

    x ``[B, T, 2, d]``, h0 ``[B, 2, N]`` -> (y ``[B, T, 2, d]``, h_T ``[B, 2, N]`` float32).
    """

    cfg: cfgs.BackboneConfig = cfgs.BackboneConfig()

    @nn.compact
    def __call__(self, x: Array, h0: Array, deterministic: bool = True) -> tuple[Array, Array]:
        c, d = self.cfg, x.shape[-1]
        n = c.state_dim
        skew = self.param("skew", scaled_normal(0.01), (n,), self.param_dtype)
        damping = self.param(
            "damping", nn.initializers.constant(c.damping_init), (n,), self.param_dtype
        )
        bx = self.linear(n, "B")(x)
        gate_logits = self.real_linear(n, "gate_proj")(p2d.to_concat(x))
        h, h_last = oscillatory_scan(
            gate_logits,
            bx,
            damping,
            skew,
            h0,
            scan_type=c.scan_type,
            chunk_size=c.chunk_size,
            unroll=c.unroll,
        )
        y = self.linear(d, "C")(h.astype(x.dtype)) + self.linear(d, "D")(x)
        # Phase-preserving dropout: one mask per complex channel, shared by the real and
        # imaginary planes (axis -2), so a kept value keeps its phase.
        y = nn.Dropout(c.dropout, broadcast_dims=(y.ndim - 2,), name="dropout")(
            y, deterministic=deterministic
        )
        return y, h_last


@BACKBONES.register("oscillatory_ssm")
class OscillatorySSM(PhaseModule):
    """Stack: h <- h + γ_l·Layer_l(LN_l(h), s_l) for each layer, then a final LN.

    γ_l (``layer_scales[l]``) start at 0.1. x ``[B, T, 2, d]``, state ``[L, B, 2, N]``
    (zeros if None) -> (y ``[B, T, 2, d]``, new state ``[L, B, 2, N]``, exact after T steps).
    """

    cfg: cfgs.BackboneConfig = cfgs.BackboneConfig()

    @staticmethod
    def init_state(cfg: cfgs.BackboneConfig, batch: int, dtype=jnp.float32) -> Array:
        return jnp.zeros((cfg.num_layers, batch, 2, cfg.state_dim), dtype)

    @nn.compact
    def __call__(
        self, x: Array, state: Array | None = None, *, deterministic: bool = True
    ) -> tuple[Array, Array]:
        c = self.cfg
        if state is None:
            state = self.init_state(c, x.shape[0], p2d.acc_dtype(x.dtype))
        scales = self.param(
            "layer_scales",
            nn.initializers.constant(c.layer_scale_init),
            (c.num_layers,),
            self.param_dtype,
        )
        # static_argnums counts self: (self, x, h0, deterministic).
        layer_cls = (
            nn.remat(OscillatorySSMLayer, static_argnums=(3,)) if c.remat else OscillatorySSMLayer
        )
        h, finals = x, []
        for i in range(c.num_layers):
            layer = layer_cls(
                cfg=c, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}"
            )
            y, s = layer(self.norm(f"norms_{i}")(h), state[i], deterministic)
            h = h + (scales[i] * y).astype(h.dtype)
            finals.append(s)
        return self.norm("output_norm")(h), jnp.stack(finals)
