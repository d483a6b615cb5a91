"""Input and output ends: morphology-aware embedding (spec §5), byte patch encoder and the
causal within-patch byte decoder (spec §11, with the target leak fixed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.core import PhaseModule, complex_table, normal_002
from qpf.ops import phase2d as p2d

Array = jax.Array

BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258


def affix_rotation_init(null_id: int):
    """N(0,1)·0.01 with the null-affix row at 0 (the identity rotation)."""

    def init(key, shape, dtype):
        return (0.01 * jax.random.normal(key, shape, dtype)).at[null_id].set(0.0)

    return init


class MorphologyEmbed(PhaseModule):
    """z = root ⊙ R_prefix · m_prefix ⊙ R_suffix · m_suffix (spec §5.3).

    R is a per-dimension Cayley rotation from ``{prefix,suffix}_rotations[id]``; m =
    0.5 + 0.5σ(magnitude[id] - 1). All factors are diagonal, so prefix and suffix commute
    (as in the original). ids ``[B, T]`` each -> ``[B, T, 2, dim]``.
    """

    cfg: cfgs.MorphologyEmbedConfig = cfgs.MorphologyEmbedConfig()
    dim: int = 256

    @nn.compact
    def __call__(
        self, root: Array, prefix: Array, suffix: Array, apply_magnitude: bool = True
    ) -> Array:
        c = self.cfg
        z = self.embedding(c.root_vocab_size, self.dim, "root_embed")(root)
        for affix, ids, vocab in (
            ("prefix", prefix, c.prefix_vocab_size),
            ("suffix", suffix, c.suffix_vocab_size),
        ):
            shape = (vocab, self.dim)
            rot = self.param(
                f"{affix}_rotations", affix_rotation_init(c.null_affix_id), shape, self.param_dtype
            )
            cos, sin = p2d.cayley(jnp.take(rot, ids, axis=0).astype(p2d.acc_dtype(z.dtype)))
            z = p2d.rotate(z, cos, sin).astype(z.dtype)
            if apply_magnitude:
                mag = self.param(f"{affix}_magnitude", normal_002, shape, self.param_dtype)
                gain = 0.5 + 0.5 * jax.nn.sigmoid(jnp.take(mag, ids, axis=0) - 1.0)
                z = z * gain[..., None, :].astype(z.dtype)
        return z


class BytePatchEncoder(PhaseModule):
    """Bytes -> patch latents (spec §11.1): right-pad with PAD to a multiple of P, embed,
    a separate complex projection per in-patch position, softmax-weighted sum, then
    output_norm(output_proj(.)). ids ``[B, T]`` -> ``[B, ceil(T/P), 2, dim]``.
    """

    vocab_size: int = 259
    dim: int = 256
    patch_size: int = 4

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        p = self.patch_size
        b, t = ids.shape
        ids = jnp.pad(ids, ((0, 0), (0, (-t) % p)), constant_values=BYTE_PAD)
        e = self.embedding(self.vocab_size, self.dim, "embed")(ids)
        e = e.reshape(b, -1, p, 2, self.dim)
        logits = self.param(
            "position_weights", nn.initializers.constant(1.0 / p), (p,), self.param_dtype
        )
        w = jax.nn.softmax(logits.astype(p2d.acc_dtype(e.dtype))).astype(e.dtype)
        latent = sum(
            w[i] * self.linear(self.dim, f"position_proj_{i}")(e[:, :, i]) for i in range(p)
        )
        return self.norm("output_norm")(self.linear(self.dim, "output_proj")(latent))


class BytePatchDecoder(PhaseModule):
    """Causal within-patch byte decoder (MegaByte-style; fixes the original's leak, §11.3).

    For target byte j in patch l = j // P, position p = j % P, the input is
    embed(byte j-1) + position_embed[p] + context_l, where context_l summarises only the
    patches before l. Each layer mixes a causal running mean over in-patch positions
    (x̄_p = mean_{q<=p} x_q) through x <- LN(L(x̄)) + x; then output_norm(output_proj(.)) and
    a real head on the concat layout. So target j sees bytes < j only.

    prev_bytes ``[B, L, P]`` (byte j-1 per target), context ``[B, L, 2, d]`` ->
    logits ``[B, L, P, V]``.
    """

    vocab_size: int = 259
    dim: int = 256
    patch_size: int = 4
    num_layers: int = 2

    @nn.compact
    def __call__(self, prev_bytes: Array, context: Array) -> Array:
        p, d = self.patch_size, self.dim
        x = self.embedding(self.vocab_size, d, "byte_embed")(prev_bytes)
        pos = complex_table(self, "position_embed", p, d, self.param_dtype)
        x = x + pos.astype(x.dtype) + context[:, :, None].astype(x.dtype)  # [B, L, P, 2, d]
        counts = jnp.arange(1, p + 1, dtype=x.dtype)[:, None, None]
        for i in range(self.num_layers):
            mean = jnp.cumsum(x, axis=2) / counts
            x = self.norm(f"layers_{i}_norm")(self.linear(d, f"layers_{i}_proj")(mean)) + x
        x = self.norm("output_norm")(self.linear(d, "output_proj")(x))
        return self.real_linear(self.vocab_size, "lm_head", use_bias=False)(p2d.to_concat(x))
