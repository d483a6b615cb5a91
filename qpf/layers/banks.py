"""The six phase banks of v4 (spec §6), registered by name.

Every bank maps ``x [B, T, 2, d]`` to ``[B, T, 2, d]`` and shares one call signature::

    y, new_state = bank(x, state, deterministic=..., language_ids=..., segment_ids=...)

All banks are position-wise except ``context`` (a causal window), whose state is the last
``window_size - 1`` inputs; the others take and return ``state=None``. ``segment_ids``
``[B, T]`` (optional, documents of a packed window): the context window reads no input
across a document start; the position-wise banks have nothing to reset and ignore it.
Residual scales, activations and the "u + u·Dropout(Re u)" pattern follow the original
exactly, including where it applies in evaluation (morphology, orthography) and where only
in training (semantic). Parameters the original created but never used (``concept_proj``, affix
projections, ``position_encoding``, the dead explicit-feature path) do not exist here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.core import CayleyRotation, PhaseModule, complex_table
from qpf.ops import norms
from qpf.ops import phase2d as p2d
from qpf.ops.segments import same_segment_lagged
from qpf.registry import Registry

Array = jax.Array

RESIDUAL = 0.1  # the original's fixed residual scale inside every bank


def prototype_mix(weights: Array, table: Array) -> Array:
    """Σ_n w_n · P_n: weights ``[..., n]``, table ``[n, 2, d]`` -> ``[..., 2, d]`` (one GEMM)."""
    flat = table.reshape(table.shape[0], -1).astype(weights.dtype)
    return (weights @ flat).reshape(*weights.shape[:-1], *table.shape[1:])


def modulus_softmax(logits_phase: Array) -> Array:
    """softmax over n of |z_n|: ``[..., 2, n]`` -> ``[..., n]`` (float32)."""
    return jax.nn.softmax(p2d.modulus(logits_phase), axis=-1)


class _Bank(PhaseModule):
    """Shared pieces: the pre-norm residual stack and the norm-then-linear output."""

    def output(self, h: Array) -> Array:
        d = h.shape[-1]
        return self.linear(d, "output_proj")(self.norm("output_norm")(h))

    def gelu_stack(self, h: Array, num_layers: int, dropout: float, deterministic: bool):
        """num_layers × [u = L(LN(h)); u = GELU(Re u)·u; (train) u += u·Drop(Re u); h += 0.1u]."""
        d = h.shape[-1]
        for i in range(num_layers):
            u = self.linear(d, f"layers_{i}")(self.norm(f"norms_{i}")(h))
            u = norms.real_gelu_scale(u)
            rng = self.dropout_rng(deterministic, dropout)
            if rng is not None:
                u = norms.real_part_dropout(u, dropout, rng)
            h = h + RESIDUAL * u
        return h


class SemanticBank(_Bank):
    """Concept attention: softmax(2·cos(x, C_n)) over a complex concept table (spec §6.1)."""

    cfg: cfgs.SemanticBankConfig = cfgs.SemanticBankConfig()

    @nn.compact
    def __call__(self, x, state=None, *, deterministic=True, language_ids=None, segment_ids=None):
        concepts = complex_table(
            self, "concept_table", self.cfg.num_concepts, x.shape[-1], self.param_dtype
        )
        acc = p2d.acc_dtype(x.dtype)
        xa, ca = x.astype(acc), concepts.astype(acc)
        dots = p2d.to_concat(xa) @ p2d.to_concat(ca).T  # [B, T, n]
        coh = dots / (p2d.l2_norm(xa)[..., None] * p2d.l2_norm(ca) + p2d.COHERENCE_EPS)
        attn = jax.nn.softmax(2.0 * coh, axis=-1)
        h = x + (RESIDUAL * prototype_mix(attn, ca)).astype(x.dtype)
        h = self.gelu_stack(h, self.cfg.num_layers, self.cfg.dropout, deterministic)
        return self.output(h), None


class ContextBank(_Bank):
    """Causal window average -> phase modulation of x (spec §6.2).

    ctx_t = Σ_k softmax(w)_k · x_{t-W+1+k} (zeros before the start, or the carried window),
    m = modulation_proj([x, context_proj(ctx)]), h = x ⊙ m/|m|, then the GELU stack.
    State: the last ``window_size - 1`` inputs ``[B, W-1, 2, d]``.
    """

    cfg: cfgs.ContextBankConfig = cfgs.ContextBankConfig()

    @staticmethod
    def init_state(cfg: cfgs.ContextBankConfig, batch: int, dim: int, dtype) -> Array:
        return jnp.zeros((batch, cfg.window_size - 1, 2, dim), dtype)

    @nn.compact
    def __call__(self, x, state=None, *, deterministic=True, language_ids=None, segment_ids=None):
        w = self.cfg.window_size
        b, t, _, d = x.shape
        logits = self.param(
            "window_weights", nn.initializers.constant(1.0 / w), (w,), self.param_dtype
        )
        if state is None:
            state = self.init_state(self.cfg, b, d, x.dtype)
        padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, 2, d]
        weights = jax.nn.softmax(logits.astype(p2d.acc_dtype(x.dtype)))
        reads = [padded[:, k : k + t] for k in range(w)]  # tap k reads x_{t-(w-1-k)}
        if segment_ids is not None:
            reads = [
                jnp.where(same_segment_lagged(segment_ids, w - 1 - k)[..., None, None], r, 0)
                for k, r in enumerate(reads)
            ]
        ctx = sum(weights[k] * reads[k] for k in range(w)).astype(x.dtype)
        ctx = self.linear(d, "context_proj")(ctx)
        m = self.linear(d, "modulation_proj")(jnp.concatenate([x, ctx], axis=-1))
        h = p2d.multiply(x, p2d.normalize(m))
        h = self.gelu_stack(h, self.cfg.num_layers, 0.0, deterministic)
        return self.output(h), padded[:, t:]


class LanguageBank(_Bank):
    """Per-language complex gate and projection (spec §6.3).

    The original used one language id per batch (a Python int); here ``language_ids [B]``
    selects per row (default 0), clipped to [0, num_languages - 1] as the original clipped.
    """

    cfg: cfgs.LanguageBankConfig = cfgs.LanguageBankConfig()

    @nn.compact
    def __call__(self, x, state=None, *, deterministic=True, language_ids=None, segment_ids=None):
        n, d = self.cfg.num_languages, x.shape[-1]
        ones = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[:, 0].set(1.0)  # noqa: E731
        gates = self.param("language_gates", ones, (n, 2, d), self.param_dtype)
        ids = jnp.zeros((x.shape[0],), jnp.int32) if language_ids is None else language_ids
        ids = jnp.clip(ids, 0, n - 1)
        h = p2d.multiply(x, gates[ids][:, None].astype(x.dtype))
        h = self.linear(d, "universal_proj")(h) + 0.5 * self._language_proj(h, ids, n)
        h = self.gelu_stack(h, self.cfg.num_layers, 0.0, deterministic)
        return self.output(h), None

    def _language_proj(self, h: Array, ids: Array, n: int) -> Array:
        """Row b uses projection ids[b]: a batched complex GEMM with gathered weights."""
        d = h.shape[-1]
        init = nn.initializers.normal(0.02)
        w_re = self.param("language_projs_kernel_re", init, (n, d, d), self.param_dtype)
        w_im = self.param("language_projs_kernel_im", init, (n, d, d), self.param_dtype)
        b_re = self.param("language_projs_bias_re", nn.initializers.zeros, (n, d), self.param_dtype)
        b_im = self.param("language_projs_bias_im", nn.initializers.zeros, (n, d), self.param_dtype)
        dt = self.dtype or jnp.result_type(h.dtype, w_re.dtype)
        kernel = jax.vmap(p2d.block_kernel)(w_re[ids], w_im[ids]).astype(dt)  # [B, 2d, 2d]
        y = jnp.einsum("btk,bkn->btn", p2d.to_concat(h).astype(dt), kernel)
        y = y + jnp.concatenate([b_re[ids], b_im[ids]], axis=-1)[:, None].astype(dt)
        return p2d.from_concat(y)


class EmotionBank(_Bank):
    """Soft emotion prototypes: h = x + 0.1·Σ softmax(Re detector(x))_n E_n (spec §6.4).

    Only the real part of the original's complex detector is used, which is the real linear
    map [x_r, x_i] @ [[W_r], [-W_i]] + b_r; it is stored as such (the imaginary bias of the
    original never reached the output).
    """

    cfg: cfgs.EmotionBankConfig = cfgs.EmotionBankConfig()

    @nn.compact
    def __call__(self, x, state=None, *, deterministic=True, language_ids=None, segment_ids=None):
        n, d = self.cfg.num_emotions, x.shape[-1]
        table = complex_table(self, "emotion_table", n, d, self.param_dtype)
        scores = self.real_linear(n, "emotion_detector")(p2d.to_concat(x))
        e = jax.nn.softmax(scores.astype(p2d.acc_dtype(x.dtype)), axis=-1)
        h = x + (RESIDUAL * prototype_mix(e, table)).astype(x.dtype)
        return self.linear(d, "proc")(self.norm("norm")(h)), None


class MorphologyBank(_Bank):
    """Pattern attention (softmax of moduli) and rotated split-GELU layers (spec §6.5)."""

    cfg: cfgs.MorphologyBankConfig = cfgs.MorphologyBankConfig()

    @nn.compact
    def __call__(self, x, state=None, *, deterministic=True, language_ids=None, segment_ids=None):
        n, d = self.cfg.num_patterns, x.shape[-1]
        table = complex_table(self, "pattern_table", n, d, self.param_dtype)
        attn = modulus_softmax(self.linear(n, "pattern_detector")(x))
        h = x + (RESIDUAL * prototype_mix(attn, table)).astype(x.dtype)
        for i in range(self.cfg.num_layers):
            u = self.norm(f"transform_layers_{i}_norm")(h)
            u = CayleyRotation(param_dtype=self.param_dtype, name=f"transform_layers_{i}_rotation")(
                u
            )
            u = norms.split_gelu(self.linear(d, f"transform_layers_{i}_linear")(u))
            # Applied in evaluation too in the original (there it is u·(1 + Re u)).
            u = norms.real_part_dropout(u, self.cfg.dropout, self._rng(deterministic))
            h = h + RESIDUAL * u
        return self.output(h), None

    def _rng(self, deterministic: bool):
        return self.dropout_rng(deterministic, self.cfg.dropout)


class OrthographyBank(_Bank):
    """Shape and script prototypes, then real-gated layers that keep phase (spec §6.6)."""

    cfg: cfgs.OrthographyBankConfig = cfgs.OrthographyBankConfig()

    @nn.compact
    def __call__(self, x, state=None, *, deterministic=True, language_ids=None, segment_ids=None):
        c, d = self.cfg, x.shape[-1]
        shapes = complex_table(self, "shape_table", c.num_shape_patterns, d, self.param_dtype)
        scripts = complex_table(self, "script_table", c.num_script_classes, d, self.param_dtype)
        a_s = modulus_softmax(self.linear(c.num_shape_patterns, "shape_detector")(x))
        a_c = modulus_softmax(self.linear(c.num_script_classes, "script_classifier")(x))
        mix = RESIDUAL * prototype_mix(a_s, shapes) + 0.05 * prototype_mix(a_c, scripts)
        h = x + mix.astype(x.dtype)
        for i in range(c.num_layers):
            u = self.linear(d, f"layers_{i}_linear")(self.norm(f"layers_{i}_norm")(h))
            g = jax.nn.sigmoid(self.real_linear(d, f"layers_{i}_gate")(p2d.to_concat(u)))
            u = u * g[..., None, :].astype(u.dtype)
            rng = self.dropout_rng(deterministic, c.dropout)
            u = norms.real_part_dropout(u, c.dropout, rng)  # in evaluation too, as the original
            h = h + RESIDUAL * u
        return self.output(h), None


# The model looks a bank up by its config's ``type`` (``qpf.config.BANK_CONFIGS``).
BANKS: Registry = Registry.of(
    "bank",
    {
        "semantic": SemanticBank,
        "context": ContextBank,
        "language": LanguageBank,
        "emotion": EmotionBank,
        "morphology": MorphologyBank,
        "orthography": OrthographyBank,
    },
)
