"""The LM head as a module that can hand out its weight instead of applying it.

``LMHead`` holds the same parameter (``kernel [F, V]``, N(0, 0.02), no bias) and computes
the same logits as ``flax.linen.Dense(V, use_bias=False)``, so checkpoints and weight
imports are unchanged. Models call ``weight(x)`` when asked for pre-head features (see
``qpf.models.family``), so the loss can fuse the head with the cross-entropy and never
build ``[B, T, V]`` logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.ops.losses import head_logits

Array = jax.Array
Dtype = Any


class LMHead(nn.Module):
    """``[..., F] -> [..., V]`` without bias; ``weight(x)`` returns the kernel ``[F, V]``."""

    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(stddev=0.02)

    def _kernel(self, in_features: int) -> Array:
        return self.param(
            "kernel", self.kernel_init, (in_features, self.vocab_size), self.param_dtype
        )

    @nn.compact
    def __call__(self, x: Array, *, return_weight: bool = False) -> Array:
        """Logits ``[..., V]`` in ``dtype``, or with ``return_weight`` the kernel ``[F, V]``."""
        kernel = self._kernel(x.shape[-1])
        if return_weight:
            return kernel
        return head_logits(x, kernel, self.dtype)
