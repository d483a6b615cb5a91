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

Array = jax.Array
Dtype = Any

DTYPES: dict[str, Dtype] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float64": jnp.float64,
}
NORMS = ("rmsnorm", "layernorm", "torch_layernorm")
NORM_EPS = 1e-6
TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default (the Wave-Native GPT classic baseline)

# GPT-2 / nanodo initialisation: N(0, 0.02) weights, zero biases, unit norm scales.
normal_002 = nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
    """RMSNorm (scale only) or LayerNorm (scale and shift) over the last axis; eps 1e-6
    ('torch_layernorm': LayerNorm with torch's eps 1e-5).

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
        elif self.kind in ("layernorm", "torch_layernorm"):
            eps = NORM_EPS if self.kind == "layernorm" else TORCH_LN_EPS
            mu = jnp.mean(xf, -1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
            bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
            y = (xf - mu) * jax.lax.rsqrt(var + eps) * scale.astype(acc) + bias.astype(acc)
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


def output_logits(c: Any, embed: nn.Embed, x: Array, dtype: Dtype, param_dtype: Dtype) -> Array:
    """Final norm and LM head (tied to ``embed`` or its own ``lm_head``): ``[B, T, d]`` ->
    ``[B, T, V]``. Call from inside the model's compact ``__call__`` (names its submodules)."""
    x = Norm(c.norm, param_dtype, name="final_norm")(x)
    if c.tie_embeddings:
        return embed.attend(x)
    return nn.Dense(
        c.vocab_size,
        use_bias=False,
        kernel_init=normal_002,
        dtype=dtype,
        param_dtype=param_dtype,
        name="lm_head",
    )(x)
