"""Pieces shared by the real-valued baselines (transformer, DiagRNN): norms, init, dtypes.

Everything here is plain real arithmetic on ``[..., dim]`` arrays. Norms are Flax's own
(statistics in float32 whatever the compute dtype), so a bfloat16 model keeps stable
normalisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from qpf.config import one_of, positive_int, rate, require
from qpf.layers.head import LMHead
from qpf.models.contract import DTYPES

Array = jax.Array
Dtype = Any

NORMS = ("rmsnorm", "layernorm", "torch_layernorm")
NORM_EPS = 1e-6
TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default (the Wave-Native GPT classic baseline)

# GPT-2 / nanodo initialisation: N(0, 0.02) weights, zero biases, unit norm scales.
normal_002 = nn.initializers.normal(stddev=0.02)


def norm(c: Any, name: str) -> nn.Module:
    """The config's norm (``c.norm``) over the last axis: Flax's RMSNorm or LayerNorm
    (eps 1e-6; 'torch_layernorm' is LayerNorm with torch's eps 1e-5).

    ``[..., d]`` -> ``[..., d]`` in the compute dtype ``c.dtype``; statistics in float32
    (float64 under x64); parameters ``scale`` (and ``bias`` for LayerNorm) in
    ``c.param_dtype``. LayerNorm uses the two-pass variance E[(x - mean)²].
    """
    kw = {"epsilon": NORM_EPS, "dtype": DTYPES[c.dtype], "param_dtype": DTYPES[c.param_dtype]}
    if c.norm == "rmsnorm":
        return nn.RMSNorm(**kw, name=name)
    if c.norm in ("layernorm", "torch_layernorm"):
        if c.norm == "torch_layernorm":
            kw["epsilon"] = TORCH_LN_EPS
        return nn.LayerNorm(**kw, use_fast_variance=False, name=name)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {c.norm!r}")


def validate_common(cfg: Any) -> None:
    """Checks every baseline config shares: sizes, dropout and norm (the dtypes are
    ``qpf.config.NumericsConfig``'s)."""
    positive_int(cfg, "vocab_size", "dim", "num_layers")
    rate(cfg, "dropout")
    one_of(cfg, "norm", NORMS)
    require(isinstance(cfg.tie_embeddings, bool), cfg, "tie_embeddings", "a bool")


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
    x = norm(c, name="final_norm")(x)
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
