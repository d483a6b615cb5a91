"""Pure-JAX reference of the fused oscillatory scan: one ``lax.scan`` over time.

Every step computes the gate, damping and Cayley rotation inline, exactly as the Pallas
kernel does, so the two can be compared step for step (and ``jax.grad`` of this function is
the ground truth for the kernel's hand-written backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def oscillatory_scan_reference(
    gate_logits: Array,
    bx: Array,
    damping_logit: Array,
    skew: Array,
    h0: Array | None = None,
) -> tuple[Array, Array]:
    """h_t = (1 - g_t)·δ·(c + i s) ⊙ h_{t-1} + g_t·Bx_t, accumulated in float32.

    Args:
      gate_logits: ``[B, T, N]``; g_t = σ(gate_logits_t).
      bx: ``[B, T, 2, N]`` complex input as real pairs (axis 2: real, imaginary).
      damping_logit: ``[N]``; δ = 0.5 + 0.5·σ(damping_logit).
      skew: ``[N]``; (c, s) = Cayley(skew) = ((1 - a²), 2a)/(1 + a²).
      h0: ``[B, 2, N]`` initial state, zeros if None.

    Returns:
      (h ``[B, T, 2, N]`` in ``bx.dtype``, h_last ``[B, 2, N]`` float32).
    """
    f32 = jnp.float32
    bsz, _, _, n = bx.shape
    h0 = jnp.zeros((bsz, 2, n), f32) if h0 is None else h0.astype(f32)
    delta = 0.5 + 0.5 * jax.nn.sigmoid(damping_logit.astype(f32))
    sk = skew.astype(f32)
    inv = 1.0 / (1.0 + sk * sk)
    c, s = (1.0 - sk * sk) * inv, 2.0 * sk * inv

    def step(h: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
        gate_t, bx_t = inputs  # [B, N], [B, 2, N]
        g = jax.nn.sigmoid(gate_t.astype(f32))
        decay = (1.0 - g) * delta
        ar, ai = decay * c, decay * s
        hr, hi = h[:, 0], h[:, 1]
        xr, xi = bx_t[:, 0].astype(f32), bx_t[:, 1].astype(f32)
        h = jnp.stack([ar * hr - ai * hi + g * xr, ar * hi + ai * hr + g * xi], axis=1)
        return h, h

    xs = (jnp.moveaxis(gate_logits, 1, 0), jnp.moveaxis(bx, 1, 0))
    h_last, hs = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(hs, 0, 1).astype(bx.dtype), h_last
