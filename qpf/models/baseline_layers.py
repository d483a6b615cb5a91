"""Pieces shared by the real-valued baselines (transformer, DiagRNN): norms, init, dtypes.

Everything here is plain real arithmetic on ``[..., dim]`` arrays. Norms compute their
statistics in float32 (float64 under x64) whatever the compute dtype, and cast back, so a
bfloat16 model keeps stable normalisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.config import _one_of, _positive_int, _rate, _require
from qpf.layers.head import LMHead

Array = jax.Array
Dtype = Any

DTYPES: dict[str, Dtype] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float64": jnp.float64,
}
NORMS = ("rmsnorm", "layernorm")
NORM_EPS = 1e-6

# GPT-2 / nanodo initialisation: N(0, 0.02) weights, zero biases, unit norm scales.
normal_002 = nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
    """RMSNorm (scale only) or LayerNorm (scale and shift) over the last axis.

    ``[..., d]`` -> ``[..., d]`` in the input dtype; statistics in float32.
    """

    kind: str = "rmsnorm"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(acc)
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        if self.kind == "rmsnorm":
            y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + NORM_EPS)
            y = y * scale.astype(acc)
        elif self.kind == "layernorm":
            mu = jnp.mean(xf, -1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
            bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
            y = (xf - mu) * jax.lax.rsqrt(var + NORM_EPS) * scale.astype(acc) + bias.astype(acc)
        else:
            raise ValueError(f"Norm.kind must be one of {', '.join(NORMS)}; got {self.kind!r}")
        return y.astype(x.dtype)


def validate_common(cfg: Any) -> None:
    """Checks every baseline config shares: sizes, dropout, norm and dtypes."""
    _positive_int(cfg, "vocab_size", "dim", "num_layers")
    _rate(cfg, "dropout")
    _one_of(cfg, "norm", NORMS)
    _one_of(cfg, "dtype", tuple(DTYPES))
    _one_of(cfg, "param_dtype", tuple(DTYPES))
    _require(isinstance(cfg.tie_embeddings, bool), cfg, "tie_embeddings", "a bool")


def output_head(
    c: Any,
    embed: nn.Embed,
    x: Array,
    dtype: Dtype,
    param_dtype: Dtype,
    return_features: bool = False,
) -> tuple[Array | None, Array | None, Array | None]:
    """Final norm and LM head (tied to ``embed`` or its own ``lm_head``).

    ``[B, T, d]`` -> (logits ``[B, T, V]``, None, None), or with ``return_features``
    (None, features ``[B, T, d]``, head weight ``[d, V]``) for the fused head + loss.
    Call from inside the model's compact ``__call__`` (names its submodules).
    """
    x = Norm(c.norm, param_dtype, name="final_norm")(x)
    if c.tie_embeddings:
        if not return_features:
            return embed.attend(x), None, None
        return None, x, embed.embedding.T
    head = LMHead(c.vocab_size, dtype, param_dtype, kernel_init=normal_002, name="lm_head")
    if not return_features:
        return head(x), None, None
    return None, x, head(x, return_weight=True)


def output_logits(c: Any, embed: nn.Embed, x: Array, dtype: Dtype, param_dtype: Dtype) -> Array:
    """Final norm and LM head (tied to ``embed`` or its own ``lm_head``): ``[B, T, d]`` ->
    ``[B, T, V]``. Call from inside the model's compact ``__call__`` (names its submodules)."""
    return output_head(c, embed, x, dtype, param_dtype)[0]
