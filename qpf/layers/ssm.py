"""Oscillatory SSM backbone (spec §8): a pre-norm residual stack of damped-rotation layers.

The defaults are the faithful v4 stack; ``BackboneConfig``'s v5 options (issue 10) swap the
eigenvalue parameterisation (LRU), the selectivity (RG-LRU), the norms, the activation, add
a causal convolution before the recurrence and a channel mixer after it, and change the block
layout (Griffin) and the matrix init. With every option at its default the parameters, their
names and the computation are exactly v4's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.blocks import (
    CausalComplexConv,
    ComplexActivation,
    ComplexGLU,
    ComplexRMSNorm,
    GeGLU,
    kernel_init,
)
from qpf.layers.core import Phase2DLinear, PhaseModule, scaled_normal
from qpf.ops import lru
from qpf.ops import phase2d as p2d
from qpf.ops.scan import linear_scan, oscillatory_scan
from qpf.ops.segments import segment_starts

Array = jax.Array
# A layer's decoding state: h ``[B, 2, N]``, or {"h": h, "conv": tail ``[B, w-1, 2, d]``}
# when the causal convolution is on (``conv_width > 0``).
LayerState = Any


class OscillatorySSMLayer(PhaseModule):
    """One layer: h_t = a_t ⊙ h_{t-1} + b_t, y_t = act(C h_t + D x_t).

    v4 (the defaults): a_t = (1 - g_t)·δ·R, b_t = g_t·Bx_t with g_t = σ(gate_proj(concat(x_t)))
    real and input-dependent only, so the whole sequence of coefficients is known up front and
    the recurrence runs through ``oscillatory_scan`` with the configured backend.
    δ = 0.5 + 0.5σ(damping), R = Cayley(skew); act is the identity. The v5 options build
    (a, b) with ``qpf.ops.lru.selective_coefficients`` and run ``linear_scan``; with
    ``conv_width`` > 0, B and the gates read a causal convolution of x (D still reads x).
    In training, a phase-preserving dropout mask ``[B, T, d]`` is shared by the real and
    imaginary parts.

    x ``[B, T, 2, d]``, state (``LayerState``: h0 ``[B, 2, N]``) -> (y ``[B, T, 2, d]``,
    the state after T steps, h float32). segment_ids ``[B, T]`` (optional): the recurrence
    carries a zero state into each document start and the convolution reads no tap across it.
    """

    cfg: cfgs.BackboneConfig = cfgs.BackboneConfig()

    def _lin(self, features: int, name: str) -> Phase2DLinear:
        return Phase2DLinear(
            features=features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kernel_init(self.cfg.init, complex_parts=True),
            name=name,
        )

    def _gate(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            kernel_init=kernel_init(self.cfg.init, complex_parts=False),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: Array,
        h0: LayerState,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> tuple[Array, LayerState]:
        c, d = self.cfg, x.shape[-1]
        n = c.state_dim
        resets = None if segment_ids is None else segment_starts(segment_ids)
        if c.conv_width > 0:
            conv = CausalComplexConv(
                c.conv_width, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
            )
            x_in, conv_tail = conv(x, h0["conv"], segment_ids)
            h0 = h0["h"]
        else:
            x_in = x
        bx = self._lin(n, "B")(x_in)
        u = p2d.to_concat(x_in)  # the gates read the real and imaginary parts
        if c.ssm == "v4":
            skew = self.param("skew", scaled_normal(0.01), (n,), self.param_dtype)
            damping = self.param(
                "damping", nn.initializers.constant(c.damping_init), (n,), self.param_dtype
            )
        else:  # LRU: ν, θ (no weight decay: their names match no decayed pattern)
            nu = self.param("nu", lru.ring_nu_init(c.r_min, c.r_max), (n,), self.param_dtype)
            theta = self.param("theta", lru.uniform_phase_init(c.max_phase), (n,), self.param_dtype)
        gate_logits = self._gate(n, "gate_proj")(u) if c.selectivity != "none" else None
        if c.v4_recurrence:
            h, h_last = oscillatory_scan(
                gate_logits,
                bx,
                damping,
                skew,
                h0,
                resets=resets,
                scan_type=c.scan_type,
                chunk_size=c.chunk_size,
                unroll=c.unroll,
            )
        else:
            log_mag, phase = (
                lru.v4_base(damping, skew) if c.ssm == "v4" else lru.lru_base(nu, theta)
            )
            input_logits = self._gate(n, "input_gate")(u) if c.selectivity == "rglru" else None
            a, b = lru.selective_coefficients(
                log_mag,
                phase,
                bx,
                selectivity=c.selectivity,
                gate_logits=gate_logits,
                input_logits=input_logits,
                normalize_input=c.ssm == "lru",
            )
            h, h_last = linear_scan(
                a,
                b,
                h0,
                resets=resets,
                scan_type=c.scan_type,
                chunk_size=c.chunk_size,
                unroll=c.unroll,
                out_dtype=bx.dtype,
            )
        y = self._lin(d, "C")(h.astype(x.dtype)) + self._lin(d, "D")(x)
        if c.activation != "v4":
            y = ComplexActivation(c.activation, self.param_dtype, name="act")(y)
        # Phase-preserving dropout: one mask per complex channel, shared by the real and
        # imaginary planes (axis -2), so a kept value keeps its phase.
        y = nn.Dropout(c.dropout, broadcast_dims=(y.ndim - 2,), name="dropout")(
            y, deterministic=deterministic
        )
        if c.conv_width > 0:
            return y, {"h": h_last, "conv": conv_tail}
        return y, h_last


class OscillatorySSM(PhaseModule):
    """Stack of ``num_layers`` SSM layers, then a final norm.

    block 'v4': h <- h + γ_l·M_l(N_l(h)), where M_l is the SSM layer followed, when a channel
    mixer is on, by y <- y + MLP_l(N'_l(y)); γ_l (``layer_scales[l]``) start at 0.1.
    block 'griffin': h <- h + SSM_l(N_l(h)); h <- h + MLP_l(N'_l(h)) (no layer scales).

    x ``[B, T, 2, d]``, state (``init_state``; zeros if None) -> (y ``[B, T, 2, d]``, new
    state, exact after T steps); ``segment_ids [B, T]`` (optional) reset every layer at
    document starts (see ``OscillatorySSMLayer``). The state is h ``[L, B, 2, N]``, or with
    ``conv_width`` > 0 {"h": ``[L, B, 2, N]``, "conv": ``[L, B, conv_width - 1, 2, d]``},
    all float32.
    """

    cfg: cfgs.BackboneConfig = cfgs.BackboneConfig()

    @staticmethod
    def init_state(
        cfg: cfgs.BackboneConfig, batch: int, dtype=jnp.float32, dim: int | None = None
    ) -> Any:
        """The zero state; ``dim`` (the model width) is needed when ``cfg.conv_width`` > 0."""
        h = jnp.zeros((cfg.num_layers, batch, 2, cfg.state_dim), dtype)
        if cfg.conv_width == 0:
            return h
        if dim is None:
            raise ValueError("OscillatorySSM.init_state: conv_width > 0 needs the model dim")
        conv = jnp.zeros((cfg.num_layers, batch, cfg.conv_width - 1, 2, dim), dtype)
        return {"h": h, "conv": conv}

    def norm(self, name: str) -> nn.Module:
        if self.cfg.norm == "rms":
            return ComplexRMSNorm(param_dtype=self.param_dtype, name=name)
        return super().norm(name)

    def _mixer(self, name: str) -> nn.Module:
        c, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if c.channel_mixer == "complex_glu":
            return ComplexGLU(c.mlp_expansion, c.activation, c.init, name=name, **kw)
        return GeGLU(c.mlp_expansion, c.init, name=name, **kw)

    def _mix(self, i: int, h: Array, deterministic: bool) -> Array:
        """Channel mixer of layer i on its own norm, with phase-preserving dropout."""
        y = self._mixer(f"mixers_{i}")(self.norm(f"mixer_norms_{i}")(h))
        return nn.Dropout(
            self.cfg.dropout, broadcast_dims=(y.ndim - 2,), name=f"mixer_dropout_{i}"
        )(y, deterministic=deterministic)

    @nn.compact
    def __call__(
        self,
        x: Array,
        state: Any = None,
        *,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Any]:
        c = self.cfg
        if state is None:
            state = self.init_state(c, x.shape[0], p2d.acc_dtype(x.dtype), x.shape[-1])
        if c.block == "v4":
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
        mixing = c.channel_mixer != "none"
        h, finals = x, []
        for i in range(c.num_layers):
            layer = layer_cls(
                cfg=c, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}"
            )
            layer_state = jax.tree.map(lambda s, i=i: s[i], state)
            y, s = layer(self.norm(f"norms_{i}")(h), layer_state, deterministic, segment_ids)
            if c.block == "v4":
                if mixing:
                    y = y + self._mix(i, y, deterministic)
                h = h + (scales[i] * y).astype(h.dtype)
            else:
                h = h + y.astype(h.dtype)
                if mixing:
                    h = h + self._mix(i, h, deterministic).astype(h.dtype)
            finals.append(s)
        return self.norm("output_norm")(h), jax.tree.map(lambda *s: jnp.stack(s), *finals)
