"""The v5 backbone building blocks (issue 10): complex RMS norm, modReLU/modSwish, causal
depthwise complex convolution and the channel mixers (complex GLU, real GeGLU).

Activations are Phase2D ``[..., 2, d]``; every parameter is real. Each module accumulates in
float32 (float64 under x64) and returns its input's dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.layers.core import Dtype, Phase2DLinear, normal_002
from qpf.ops import norms
from qpf.ops import phase2d as p2d
from qpf.ops.segments import same_segment_lagged

Array = jax.Array


def xavier_orthogonal(parts: int = 1) -> nn.initializers.Initializer:
    """An orthogonal ``[in, out]`` matrix whose entries have Xavier's variance 2/(in + out).

    A (semi-)orthogonal in×out matrix has entry variance 1/max(in, out); it is rescaled to
    2/(in + out) (gain √(2/(in + out)) per entry). ``parts`` = 2 for the real and imaginary
    kernels of one complex matrix: each gets half the variance, so the complex entries have
    variance 2/(in + out).
    """

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        fan_in, fan_out = shape[-2], shape[-1]
        scale = (2.0 * max(fan_in, fan_out) / (fan_in + fan_out) / parts) ** 0.5
        return nn.initializers.orthogonal(scale)(key, shape, dtype)

    return init


def kernel_init(init: str, complex_parts: bool) -> nn.initializers.Initializer:
    """The matrix initialiser named by ``BackboneConfig.init`` ('v4' or 'orthogonal')."""
    if init == "orthogonal":
        return xavier_orthogonal(2 if complex_parts else 1)
    return normal_002


class ComplexRMSNorm(nn.Module):
    """Phase-preserving complex RMS norm (``qpf.ops.norms.complex_rms_norm``). ``[..., 2, d]``."""

    eps: float = norms.RMS_NORM_EPS
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return norms.complex_rms_norm(x, scale, self.eps)


class ComplexActivation(nn.Module):
    """A phase-aware activation by name. ``[..., 2, d]`` -> same.

    'v4': GELU(Re u)·u (the v4 banks' activation; no parameters). 'modrelu':
    relu(|z| + b)·z/|z| with ``bias [d]`` (init 0: the identity on |z| > 0). 'modswish':
    z·σ(β|z| + b) with ``beta [d]`` (init 1) and ``bias [d]`` (init 0).
    """

    kind: str
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        if self.kind == "v4":
            xa = x.astype(p2d.acc_dtype(x.dtype))
            return norms.real_gelu_scale(xa).astype(x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        if self.kind == "modrelu":
            return norms.modrelu(x, bias)
        if self.kind == "modswish":
            beta = self.param("beta", nn.initializers.ones, (d,), self.param_dtype)
            return norms.modswish(x, beta, bias)
        raise ValueError(f"activation must be v4, modrelu or modswish; got {self.kind!r}")


def _identity_tap_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """N(0, 0.02) taps with the current-token tap (row 0) at 1: the conv starts near identity."""
    w = normal_002(key, shape, dtype)
    return w.at[0].add(1.0)


class CausalComplexConv(nn.Module):
    """Causal depthwise complex convolution y_t = b + Σ_{k<w} w_k ⊙ x_{t-k} (complex ⊙).

    Each complex channel has its own ``width`` complex taps (``kernel_re``/``kernel_im``
    ``[width, d]``; tap 0 is the current token and starts at 1) and a complex bias. A global
    phase rotation of the input rotates the output, as for every Phase2D linear map.

    x ``[B, T, 2, d]``, tail ``[B, width - 1, 2, d]`` (the previous inputs, oldest first;
    zeros at position 0) -> (y ``[B, T, 2, d]``, new tail ``[B, width - 1, 2, d]`` float32).
    segment_ids ``[B, T]`` (optional): no tap reads across a document start (the tail
    belongs to the first document).
    """

    width: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, tail: Array, segment_ids: Array | None = None
    ) -> tuple[Array, Array]:
        w, d, t = self.width, x.shape[-1], x.shape[1]
        k_re = self.param("kernel_re", _identity_tap_init, (w, d), self.param_dtype)
        k_im = self.param("kernel_im", normal_002, (w, d), self.param_dtype)
        b_re = self.param("bias_re", nn.initializers.zeros, (d,), self.param_dtype)
        b_im = self.param("bias_im", nn.initializers.zeros, (d,), self.param_dtype)
        acc = p2d.acc_dtype(x.dtype)
        xp = jnp.concatenate([tail.astype(acc), x.astype(acc)], axis=1)  # [B, T + w - 1, 2, d]
        y = jnp.broadcast_to(p2d.join(b_re, b_im).astype(acc), x.shape)
        for k in range(w):  # tap k reads x_{t-k}: offset w - 1 - k in the padded sequence
            tap = p2d.join(k_re[k], k_im[k]).astype(acc)
            read = xp[:, w - 1 - k : w - 1 - k + t]
            if segment_ids is not None and k > 0:
                read = jnp.where(same_segment_lagged(segment_ids, k)[..., None, None], read, 0.0)
            y = y + p2d.multiply(tap, read)
        new_tail = xp[:, xp.shape[1] - (w - 1) :]
        return y.astype(self.dtype or x.dtype), new_tail


class ComplexGLU(nn.Module):
    """Complex gated unit: W_o (act(W_g z) ⊙ W_v z), ⊙ the complex product.

    Hidden width ``expansion``·d complex. z ``[..., 2, d]`` -> ``[..., 2, d]``.
    """

    expansion: int
    activation: str
    init: str = "v4"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _linear(self, features: int, name: str) -> Phase2DLinear:
        return Phase2DLinear(
            features=features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kernel_init(self.init, complex_parts=True),
            name=name,
        )

    @nn.compact
    def __call__(self, z: Array) -> Array:
        d = z.shape[-1]
        hidden = self.expansion * d
        gate = ComplexActivation(self.activation, self.param_dtype, name="act")(
            self._linear(hidden, "gate")(z)
        )
        value = self._linear(hidden, "value")(z)
        acc = p2d.acc_dtype(z.dtype)
        h = p2d.multiply(gate.astype(acc), value.astype(acc)).astype(value.dtype)
        return self._linear(d, "out")(h)


class GeGLU(nn.Module):
    """Real GeGLU on the concat layout: W_o (GELU(W_g u) · W_v u), u = [re, im] ``[2d]``.

    Hidden width ``expansion``·d real, so its parameter count equals ComplexGLU's.
    z ``[..., 2, d]`` -> ``[..., 2, d]``.
    """

    expansion: int
    init: str = "v4"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            kernel_init=kernel_init(self.init, complex_parts=False),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, z: Array) -> Array:
        d = z.shape[-1]
        u = p2d.to_concat(z)
        hidden = self.expansion * d
        g = self._dense(hidden, "gate")(u)
        g = norms.gelu(g.astype(p2d.acc_dtype(g.dtype))).astype(g.dtype)
        h = g * self._dense(hidden, "value")(u)
        return p2d.from_concat(self._dense(2 * d, "out")(h))
