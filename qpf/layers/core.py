"""Basic Phase2D Flax modules: linear map, layer norm, Cayley rotation, embedding.

Activations are planar Phase2D arrays ``[..., 2, d]`` (see ``qpf.ops.phase2d``). Every
parameter is real. Initialisers reproduce the original model's *effective* initialisation
(after its ``_init_weights`` pass): weights N(0, 0.02), zero biases, unit norm scales.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.ops import norms
from qpf.ops import phase2d as p2d

Array = jax.Array
Dtype = Any

normal_002 = nn.initializers.normal(stddev=0.02)


def scaled_normal(scale: float) -> nn.initializers.Initializer:
    """N(0, 1)·scale (the original's init of Cayley skews)."""
    return nn.initializers.normal(stddev=scale)


def complex_table(
    module: nn.Module, name: str, rows: int, dim: int, dtype: Dtype, init=normal_002
) -> Array:
    """A complex parameter table ``[rows, 2, dim]`` (real and imaginary planes)."""
    return module.param(name, init, (rows, 2, dim), dtype)


class Phase2DLinear(nn.Module):
    """Complex linear map y = x W + b as one real GEMM (block matrix, concat layout).

    ``[..., 2, in]`` -> ``[..., 2, features]``. Parameters ``kernel_re``/``kernel_im``
    ``[in, features]`` and ``bias_re``/``bias_im`` ``[features]``. ``kernel_init`` initialises
    each of the two real kernels (default: the original's N(0, 0.02)).
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = normal_002

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (x.shape[-1], self.features)
        w_re = self.param("kernel_re", self.kernel_init, shape, self.param_dtype)
        w_im = self.param("kernel_im", self.kernel_init, shape, self.param_dtype)
        b_re = b_im = None
        if self.use_bias:
            b_re = self.param("bias_re", nn.initializers.zeros, (self.features,), self.param_dtype)
            b_im = self.param("bias_im", nn.initializers.zeros, (self.features,), self.param_dtype)
        return p2d.complex_linear(x, w_re, w_im, b_re, b_im, dtype=self.dtype)


def dense(
    features: int,
    *,
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """Real linear layer ``[..., in] -> [..., features]`` with the original's init."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=normal_002,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class Phase2DLayerNorm(nn.Module):
    """The original's Phase2DLayerNorm (see ``qpf.ops.norms.phase_layer_norm``). ``[..., 2, d]``."""

    eps: float = norms.LAYER_NORM_EPS
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return norms.phase_layer_norm(x, scale, self.eps)


class CayleyRotation(nn.Module):
    """Per-dimension Cayley rotation x ⊙ (c + i s) from a free skew parameter. ``[..., 2, d]``.

    The original calls it ``IotaBlock``.
    """

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        skew = self.param("skew", scaled_normal(0.01), (x.shape[-1],), self.param_dtype)
        c, s = p2d.cayley(skew.astype(p2d.acc_dtype(x.dtype)))
        return p2d.rotate(x, c, s).astype(x.dtype)


class Phase2DEmbed(nn.Module):
    """Token id -> Phase2D vector from two real tables. ``[...]`` int -> ``[..., 2, dim]``.

    Both tables start N(0, 0.02) (the original's effective init). There is no frozen padding
    row: the original froze GPT-2 token 0 ('!') by mistake (bug 22.6); padded positions are
    masked in the loss instead. ``head_weight`` hands out the tables as a tied LM head.
    """

    vocab_size: int
    dim: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        shape = (self.vocab_size, self.dim)
        self.embedding_re = self.param("embedding_re", normal_002, shape, self.param_dtype)
        self.embedding_im = self.param("embedding_im", normal_002, shape, self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        x = p2d.join(
            jnp.take(self.embedding_re, ids, axis=0), jnp.take(self.embedding_im, ids, axis=0)
        )
        return x.astype(self.dtype or x.dtype)

    def head_weight(self) -> Array:
        """The tables as an LM head ``[2·dim, V]`` over concatenated features
        ``[re | im]``: logit_v = Re(⟨z, e_v⟩) = z_re·e_re,v + z_im·e_im,v."""
        return jnp.concatenate([self.embedding_re, self.embedding_im], axis=1).T


class PhaseModule(nn.Module):
    """Base for modules that create Phase2D sublayers in a shared compute/param dtype."""

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def linear(self, features: int, name: str, use_bias: bool = True) -> Phase2DLinear:
        return Phase2DLinear(
            features=features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def embedding(self, vocab_size: int, dim: int, name: str) -> Phase2DEmbed:
        return Phase2DEmbed(
            vocab_size=vocab_size,
            dim=dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def norm(self, name: str) -> Phase2DLayerNorm:
        return Phase2DLayerNorm(param_dtype=self.param_dtype, name=name)

    def real_linear(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def dropout_rng(self, deterministic: bool, rate: float) -> jax.Array | None:
        """A fresh 'dropout' key in training (rate > 0), else None."""
        if deterministic or rate <= 0.0:
            return None
        return self.make_rng("dropout")
