"""The v2 "Quantum-Inspired LM" (qllm2 ``v2/``, ``HardwareOptimizedQuantumLLM``), family
``qllm_v2``. Spec: ``shared/specs/v2_v3.md`` part A.

Data flow (``mode='faithful'`` is the original, leaks included; ``mode='causal'``, the
default, restricts every step to positions <= t of the same sample, spec §A11)::

    tokens [B, T]
      e0 = E_tok[x] + E_pos[t]                                           [B, T, D]
      c, concept_logits = ConceptLayer(x)          (attention masked when causal)
      e1 = e0 + 0.3·Linear(c)
      e2 = e1 + W_pp·tanh(θ), θ = golden + 0.5·S[x] + 0.3·f[x] + 0.2·Ppos[t]
      e3 = GlobalInterference(e2)        (sequence mean | running mean of the heads)
      e4 = e3 + 0.2·PhaseCoherence(e3, x)          (windows forward+backward | backward)
      [evolve(e4, step) when config.evolve, training only]
      L x Processor: one affine branch, chosen by input variance κ
            faithful: one κ per batch, lax.switch;  causal: running κ per token
      logits = Linear(e) + 0.1·concept_logits                            [B, T, V]

The auxiliary losses (``qpf.models.qllm_v2_losses``) read ``phase_representation``, which
reruns the front end and processor layer 0.

Decoding state ``{"pos": int32 [], "tokens": int32 [B, S]}``: the tokens seen so far. A call
with a state writes its tokens at ``pos`` and runs the model over the whole buffer (the
original recomputes the sequence each step too); in causal mode the unwritten slots cannot
reach earlier positions, so chunked calls equal one pass exactly. In faithful mode they can
(the zeros in unwritten slots leak backwards like any future token); use
``qpf.generation.qllm_v2.faithful_generate`` for the original's generation. pos + T > S
gives NaN logits (no silent clamping under jit).

Parameters that the original allocates but never uses (``semantic_clusters``,
``cluster_assignments``, ``entanglement_strength``, ``measurement_threshold``, the constant
``scales``/``context_window``, ``language_gates`` rows > 0 and ``phase_init`` beyond P) are not
allocated; ``original_param_count`` adds them back to compare with the original's counts.
``quantum_uncertainty`` exists only with ``evolve=True`` (it is read only there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.config import ConfigError, NumericsConfig, one_of, positive_int, rate, require
from qpf.models.baseline_layers import DTYPES
from qpf.models.contract import ModelOutput, applies_matmul_precision
from qpf.models.family import ModelFamily, Preset, State
from qpf.ops import qllm_v2 as ops

Array = jax.Array

MODES = ("causal", "faithful")
LN_EPS = 1e-5  # torch nn.LayerNorm


@dataclasses.dataclass(frozen=True)
class QLLMv2Config(NumericsConfig):
    """The v2 model.

    mode: 'causal' (default) or 'faithful' (the original's non-causal forward).
    dim D, num_layers, num_heads H (global-interference heads), phase_dim P <= D,
    concept_dim C, num_concepts K (512 upstream), concept_heads (8 upstream, divides C),
    concept_blocks (2 upstream), max_seq_len (position tables).
    processor_max_dim: the processors' width cap (1024 upstream): ⌊log₁.₅(max/D)⌋ levels.
    similarity_rank: None = the original V×V ``token_similarity``; r = a V×r table whose
      normalised rows give the similarities (for large vocabularies, spec §A11).
    scales: multi-scale coherence window sizes; context_window: ±c of context coherence;
      semantic_window: ±W of semantic coherence (faithful also clips both to T//2).
    evolve: apply ``evolve_quantum_state`` in training calls that pass ``training_step``.
    language_id: row of the language gates (only row 0 exists, as upstream uses only it).
    matmul_precision: precision of float32 matrix products (``qpf.config.MATMUL_PRECISIONS``).
    dtype: compute dtype of the dense layers; trig, norms and softmax run in float32.
    """

    family_name: ClassVar[str] = "qllm_v2"  # its qpf.zoo family (not a field)

    vocab_size: int = 256
    dim: int = 512
    num_layers: int = 8
    num_heads: int = 8
    phase_dim: int = 64
    concept_dim: int = 256
    num_concepts: int = 512
    concept_heads: int = 8
    concept_blocks: int = 2
    max_seq_len: int = 512
    processor_max_dim: int = 1024
    similarity_rank: int | None = None
    scales: tuple[int, ...] = (1, 2, 4, 8, 16)
    context_window: int = 8
    semantic_window: int = 8
    dropout: float = 0.1
    mode: str = "causal"
    evolve: bool = False
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(
            self,
            "vocab_size",
            "dim",
            "num_layers",
            "num_heads",
            "phase_dim",
            "concept_dim",
            "num_concepts",
            "concept_heads",
            "concept_blocks",
            "max_seq_len",
            "processor_max_dim",
            "context_window",
            "semantic_window",
        )
        one_of(self, "mode", MODES)
        rate(self, "dropout")
        require(self.phase_dim <= self.dim, self, "phase_dim", f"an int in [1, dim={self.dim}]")
        require(
            self.concept_dim % self.concept_heads == 0,
            self,
            "concept_heads",
            f"a divisor of concept_dim={self.concept_dim}",
        )
        if self.similarity_rank is not None:
            positive_int(self, "similarity_rank")
        require(
            isinstance(self.scales, tuple)
            and len(self.scales) > 0
            and all(isinstance(s, int) and s > 0 for s in self.scales),
            self,
            "scales",
            "a non-empty tuple of ints > 0",
        )
        for f in ("evolve", "use_checkpoint"):
            require(isinstance(getattr(self, f), bool), self, f, "a bool")

    @property
    def causal(self) -> bool:
        return self.mode == "causal"

    @property
    def processor_widths(self) -> tuple[int, ...]:
        return ops.processor_widths(self.dim, self.processor_max_dim)


# ------------------------------------------------------------------ initialisers


def torch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """U(−1/√fan_in, 1/√fan_in): torch's nn.Linear weight and bias init."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def golden_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """phase_init_i = 0.02·sin(2π·i·φ)."""
    del key
    i = jnp.arange(shape[0], dtype=jnp.float32)
    return (0.02 * jnp.sin(2.0 * math.pi * i * ops.GOLDEN_RATIO)).astype(dtype)


def uniform_sym(bound: float) -> nn.initializers.Initializer:
    """U(−bound, bound)."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear_params(
    module: nn.Module, name: str, fan_in: int, features: int, use_bias: bool, pdt: Any
) -> tuple[Array, Array | None]:
    """torch nn.Linear parameters (U(±1/√fan_in)) as ``{name}_kernel [in, out]``, ``_bias``."""
    init = torch_uniform(fan_in)
    kernel = module.param(f"{name}_kernel", init, (fan_in, features), pdt)
    bias = module.param(f"{name}_bias", init, (features,), pdt) if use_bias else None
    return kernel, bias


def affine(x: Array, kernel: Array, bias: Array | None) -> Array:
    """x ``[..., in]`` · kernel ``[in, out]`` + bias, in x's dtype."""
    y = x @ kernel.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


class Linear(nn.Module):
    """torch nn.Linear: x ``[..., in]`` -> ``[..., out]``; kernel stored ``[in, out]``."""

    features: int
    use_bias: bool = True
    kernel_std: float | None = None  # N(0, std) instead of torch's uniform
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        k_init = torch_uniform(fan_in) if self.kernel_std is None else normal(self.kernel_std)
        kernel = self.param("kernel", k_init, (fan_in, self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", torch_uniform(fan_in), (self.features,), self.param_dtype)
        return affine(x.astype(self.dtype), kernel, bias)


def _kw(c: QLLMv2Config) -> dict[str, Any]:
    return {"dtype": DTYPES[c.dtype], "param_dtype": DTYPES[c.param_dtype]}


def _ln(c: QLLMv2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, param_dtype=DTYPES[c.param_dtype], name=name)


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _f32(x: Array) -> Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ------------------------------------------------------------------ concept layer


class ConceptAttention(nn.Module):
    """torch nn.MultiheadAttention (batch_first) with an optional causal mask.

    x ``[B, T, C]`` -> (out ``[B, T, C]``, head-averaged weights ``[B, T, T]``).
    """

    cfg: QLLMv2Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> tuple[Array, Array]:
        c = self.cfg
        dim, heads = c.concept_dim, c.concept_heads
        xavier = uniform_sym(math.sqrt(6.0 / (4 * dim)))  # torch's stacked [3C, C]

        def proj(name: str) -> Array:
            kernel = self.param(name + "_kernel", xavier, (dim, dim), DTYPES[c.param_dtype])
            bias = self.param(name + "_bias", nn.initializers.zeros, (dim,), DTYPES[c.param_dtype])
            y = jnp.einsum("btc,cd->btd", x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
            return y.reshape(*x.shape[:2], heads, dim // heads)

        q, k, v = proj("q"), proj("k"), proj("v")
        logits = jnp.einsum("bqhd,bkhd->bhqk", _f32(q), _f32(k)) / math.sqrt(dim // heads)
        if c.causal:
            n = x.shape[1]
            mask = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        weights = jnp.mean(probs, axis=1)
        probs = nn.Dropout(c.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(x.dtype), v).reshape(x.shape)
        kernel = self.param("out_kernel", torch_uniform(dim), (dim, dim), DTYPES[c.param_dtype])
        bias = self.param("out_bias", nn.initializers.zeros, (dim,), DTYPES[c.param_dtype])
        out = affine(out, kernel, bias)
        return out, weights


class ConceptLayer(nn.Module):
    """tokens ``[B, T]`` -> (concepts ``[B, T, C]``, concept logits ``[B, T, V]``, taps)."""

    cfg: QLLMv2Config

    @nn.compact
    def __call__(self, tokens: Array, deterministic: bool) -> tuple[Array, Array, dict]:
        c = self.cfg
        kw = _kw(c)
        pdt = DTYPES[c.param_dtype]
        drop = nn.Dropout(c.dropout)
        wcm = self.param("word_concept_map", normal(0.02), (c.vocab_size, c.num_concepts), pdt)
        emb = self.param("concept_embeddings", normal(0.02), (c.num_concepts, c.concept_dim), pdt)
        gate = self.param("language_gates", normal(0.02), (1, c.concept_dim), pdt)
        x = jnp.take(wcm, tokens, axis=0).astype(kw["dtype"]) @ emb.astype(kw["dtype"])
        x = x * jax.nn.sigmoid(_f32(gate[0])).astype(x.dtype)
        norm1 = _ln(c, "norm1")  # shared by the blocks, as upstream
        for i in range(c.concept_blocks):
            h = _gelu(Linear(c.concept_dim, name=f"concept_projections_{i}", **kw)(norm1(x)))
            x = x + 0.1 * drop(h, deterministic=deterministic)
        taps = {"concept/pre_attn": x}
        attn, weights = ConceptAttention(c, name="concept_attention")(
            _ln(c, "norm2")(x), deterministic
        )
        taps.update({"concept/attn_out": attn, "concept/attn_weights": weights})
        x = x + drop(attn, deterministic=deterministic)
        taps["concept/post_attn"] = x
        x = x + 0.1 * jnp.tanh(Linear(c.concept_dim, name="semantic_coherence", **kw)(x))
        logits = Linear(c.vocab_size, use_bias=False, name="concept_to_token", **kw)(x)
        return x, logits, taps


# ------------------------------------------------------------------ global interference


class GlobalInterference(nn.Module):
    """e ``[B, T, D]`` -> (e + Drop(LN(W·concat_h C_h)), LN output); see module docstring."""

    cfg: QLLMv2Config

    @nn.compact
    def __call__(self, e: Array, deterministic: bool) -> tuple[Array, Array]:
        c = self.cfg
        d, h = c.dim, c.num_heads
        pdt, dt = DTYPES[c.param_dtype], DTYPES[c.dtype]
        drop = nn.Dropout(c.dropout)
        g = self.param("global_phase", normal(0.02), (d,), pdt)
        w1 = self.param("head_weights", normal(0.02), (h, d, 2 * d), pdt)
        b1 = self.param("head_biases", normal(0.02), (h, 2 * d), pdt)
        w2 = self.param("head_weights2", normal(0.02), (h, 2 * d, d), pdt)
        b2 = self.param("head_biases2", normal(0.02), (h, d), pdt)
        u = jnp.sin(_f32(e) - _f32(g)).astype(dt)
        t = _gelu(jnp.einsum("btd,hde->bthe", u, w1.astype(dt)) + b1.astype(dt))
        t = drop(t, deterministic=deterministic)
        t = jnp.einsum("bthe,hed->bthd", t, w2.astype(dt)) + b2.astype(dt)
        t = drop(t, deterministic=deterministic)
        ctx = ops.interference_context(t, c.causal).reshape(*e.shape[:2], h * d)
        normed = _ln(c, "norm")(Linear(d, name="output_proj", **_kw(c))(ctx))
        return e + drop(normed, deterministic=deterministic), normed


# ------------------------------------------------------------------ phase coherence


class PhaseCoherence(nn.Module):
    """AdvancedPhaseCoherence: e3 ``[B, T, D]``, tokens ``[B, T]`` -> (r ``[B, T, D]``, taps)."""

    cfg: QLLMv2Config

    @nn.compact
    def __call__(self, e: Array, tokens: Array, deterministic: bool) -> tuple[Array, dict]:
        c = self.cfg
        kw = _kw(c)
        pdt = DTYPES[c.param_dtype]
        drop = nn.Dropout(c.dropout)
        n = e.shape[1]
        p = jnp.tanh(_f32(e))
        ms = ops.multi_scale_coherence(p, c.scales, c.causal)
        width = c.similarity_rank or c.vocab_size
        table = self.param("token_similarity", normal(0.02), (c.vocab_size, width), pdt)
        rows = ops.normalize_rows(jnp.take(table, tokens, axis=0))
        if c.causal:  # fixed widths: a window must not depend on the sequence length
            sem_w, ctx_w = c.semantic_window, c.context_window
        else:
            sem_w, ctx_w = min(c.semantic_window, n // 2), max(1, min(c.context_window, n // 2))
        sem = ops.semantic_coherence(p, rows, sem_w, c.causal)
        ctx = ops.context_coherence(e, ctx_w, c.causal)
        loc = ops.local_coherence(e, c.causal)
        d = c.dim
        fused = jnp.concatenate(
            [
                Linear(d, name="scale_projection", **kw)(ms.astype(kw["dtype"])),
                Linear(d, name="semantic_projection", **kw)(sem.astype(kw["dtype"])),
                Linear(d, name="context_projection", **kw)(ctx.astype(kw["dtype"])),
                loc.astype(kw["dtype"]),
            ],
            axis=-1,
        )
        fused = _ln(c, "norm1")(Linear(d, name="coherence_fusion", **kw)(fused))
        taps = {
            "apc/multi_scale": ms,
            "apc/semantic": sem,
            "apc/context_cos": ctx,
            "apc/fused_norm": fused,
        }
        x = drop(_gelu(fused), deterministic=deterministic)
        norm2 = _ln(c, "norm2")  # shared by the three blocks, as upstream
        for i in range(3):
            y = _gelu(Linear(d, name=f"coherence_enhancement_{i}", **kw)(norm2(x)))
            x = x + 0.1 * drop(y, deterministic=deterministic)
        return _ln(c, "norm3")(x), taps


# ------------------------------------------------------------------ processor


class Processor(nn.Module):
    """OptimizedDynamicPhaseProcessor: one affine branch per input, chosen by variance κ.

    x ``[B, T, D]`` -> (y ``[B, T, D]``, κ, level). Faithful: κ and the level are scalars
    for the batch and ``lax.switch`` runs one branch. Causal: running κ ``[B, T]`` and a
    level per token; every branch is computed and each token takes its own.
    """

    cfg: QLLMv2Config

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array, Array]:
        c = self.cfg
        pdt = DTYPES[c.param_dtype]
        x = x.astype(DTYPES[c.dtype])
        widths = c.processor_widths
        base = linear_params(self, "base_op", c.dim, c.dim, True, pdt)
        expand = [
            linear_params(self, f"expand_ops_{i}", w, w, True, pdt) for i, w in enumerate(widths)
        ]
        contract = [
            linear_params(self, f"contract_ops_{i}", w, c.dim, True, pdt)
            for i, w in enumerate(widths)
        ]

        def branch(level: int):
            if level == 0:
                return lambda v: affine(v, *base)
            w = widths[level - 1]
            return lambda v: affine(
                affine(ops.tile_features(v, w), *expand[level - 1]), *contract[level - 1]
            )

        branches = [branch(i) for i in range(len(widths) + 1)]
        if not c.causal:
            kappa = ops.batch_kappa(x)
            level = ops.level_from_kappa(kappa, len(widths))
            return jax.lax.switch(level, branches, x), kappa, level
        kappa = ops.causal_kappa(x)
        level = ops.level_from_kappa(kappa, len(widths))
        out = branches[0](x)
        for i in range(1, len(branches)):
            out = jnp.where((level == i)[..., None], branches[i](x), out)
        return out, kappa, level


# ------------------------------------------------------------------ the model


class QLLMv2(nn.Module):
    """The v2 model; follows the ``ModelFamily`` call contract (see module docstring)."""

    config: QLLMv2Config

    def setup(self) -> None:
        c = self.config
        kw = _kw(c)
        pdt = kw["param_dtype"]
        self.token_embedding = nn.Embed(c.vocab_size, c.dim, embedding_init=normal(1.0), **kw)
        self.pos_embedding = nn.Embed(c.max_seq_len, c.dim, embedding_init=normal(1.0), **kw)
        self.concept_layer = ConceptLayer(c)
        self.concept_projection = Linear(c.dim, **kw)
        self.phase_init = self.param("phase_init", golden_init, (c.phase_dim,), pdt)
        self.semantic_phase_map = nn.Embed(
            c.vocab_size, c.phase_dim, embedding_init=normal(0.02), **kw
        )
        self.frequency_phase_adjust = self.param(
            "frequency_phase_adjust", normal(0.01), (c.vocab_size,), pdt
        )
        self.position_phase_mod = self.param(
            "position_phase_mod", normal(0.01), (c.max_seq_len, c.phase_dim), pdt
        )
        self.phase_projection = Linear(c.dim, use_bias=False, kernel_std=0.02, **kw)
        self.global_interference = GlobalInterference(c)
        self.advanced_phase_coherence = PhaseCoherence(c)
        layer = nn.remat(Processor) if c.use_checkpoint else Processor
        self.quantum_layers = [layer(c) for _ in range(c.num_layers)]
        self.output_proj = Linear(c.vocab_size, **kw)
        if c.evolve:
            self.quantum_uncertainty = self.param(
                "quantum_uncertainty", nn.initializers.constant(0.1), (), pdt
            )

    def front(self, tokens: Array, deterministic: bool) -> tuple[Array, Array, dict]:
        """Steps 1–6: tokens ``[B, T]`` -> (e4 ``[B, T, D]``, concept logits, taps)."""
        c = self.config
        n = tokens.shape[1]
        tok = self.token_embedding(tokens)
        pos = self.pos_embedding(jnp.arange(n))[None]
        concepts, concept_logits, taps = self.concept_layer(tokens, deterministic)
        taps.update(
            {
                "tok_emb": tok,
                "pos_emb": pos,
                "concept/repr": concepts,
                "concept/logits": concept_logits,
            }
        )
        proj = self.concept_projection(concepts)
        taps["concept/projected"] = proj
        e = tok + pos + 0.3 * proj
        theta = ops.phase_angles(
            ops.golden_phase(_f32(self.phase_init), n, c.phase_dim),
            _f32(self.semantic_phase_map(tokens)),
            _f32(jnp.take(self.frequency_phase_adjust, tokens, axis=0)),
            _f32(self.position_phase_mod[:n]),
        )
        phase = self.phase_projection(jnp.tanh(theta).astype(e.dtype))
        taps["phase/projected"] = phase
        e = e + phase
        taps["gi/in"] = e
        e, normed = self.global_interference(e, deterministic)
        taps.update({"gi/normed": normed, "gi/out": e})
        r, apc_taps = self.advanced_phase_coherence(e, tokens, deterministic)
        taps.update(apc_taps)
        taps["apc/out"] = r
        e = e + 0.2 * r.astype(e.dtype)
        taps["layers_in"] = e
        return e, concept_logits, taps

    def evolve_state(self, e: Array, step: Array) -> Array:
        """The training-only evolve step with draws from the 'quantum' (else 'dropout') rng."""
        key = self.make_rng("quantum" if self.has_rng("quantum") else "dropout")
        k1, k2, k3 = jax.random.split(key, 3)
        n = e.shape[1]
        return ops.evolve_quantum_state(
            e,
            step,
            self.quantum_uncertainty.astype(e.dtype),
            jax.random.normal(k1, e.shape, e.dtype),
            jax.random.normal(k2, (n, n), e.dtype),
            jax.random.uniform(k3, (), jnp.float32),
            self.config.causal,
        )

    def phase_representation(
        self, tokens: Array, deterministic: bool = True
    ) -> tuple[Array, Array]:
        """(amplitude, phase) ``[B, T, D]`` each: front end, processor layer 0, then
        tanh(q) and 2π·σ(q) + 0.1·W_pp·S[x] (the original's complex tensor as a pair)."""
        e, _, _ = self.front(tokens, deterministic)
        q, _, _ = self.quantum_layers[0](e)
        return ops.phase_representation(q, self.phase_projection(self.semantic_phase_map(tokens)))

    def forward_tokens(
        self, tokens: Array, deterministic: bool, training_step: Array | None
    ) -> tuple[Array, dict]:
        """tokens ``[B, T]`` -> (logits ``[B, T, V]``, taps)."""
        c = self.config
        e, concept_logits, taps = self.front(tokens, deterministic)
        if c.evolve and not deterministic and training_step is not None:
            e = self.evolve_state(e, training_step)
        for i, layer in enumerate(self.quantum_layers):
            e, kappa, level = layer(e)
            taps.update({f"layer/{i}/kappa": kappa, f"layer/{i}/level": level, f"layer/{i}/out": e})
        logits = self.output_proj(e) + 0.1 * concept_logits
        return logits, taps

    @applies_matmul_precision
    def __call__(
        self,
        inputs: Array,
        state: State | None = None,
        *,
        deterministic: bool = True,
        training_step: Array | None = None,
        return_intermediates: bool = False,
    ) -> ModelOutput:
        """inputs int ``[B, T]``, state None or ``init_state(...)`` -> ModelOutput."""
        zero = jnp.zeros((), jnp.float32)
        if state is None:
            logits, taps = self.forward_tokens(inputs, deterministic, training_step)
            new_state = {
                "pos": jnp.asarray(inputs.shape[1], jnp.int32),
                "tokens": inputs.astype(jnp.int32),
            }
        else:
            pos = state["pos"]
            t = inputs.shape[1]
            buf = jax.lax.dynamic_update_slice(state["tokens"], inputs.astype(jnp.int32), (0, pos))
            full, taps = self.forward_tokens(buf, deterministic, training_step)
            logits = jax.lax.dynamic_slice_in_dim(full, pos, t, axis=1)
            overflow = pos + t > buf.shape[1]
            logits = jnp.where(overflow, jnp.nan, logits)
            new_state = {"pos": pos + t, "tokens": buf}
        return ModelOutput(
            logits=logits,
            phase_states=None,
            coupling_loss=zero,
            state=new_state,
            intermediates=taps if return_intermediates else None,
        )


def init_state(config: QLLMv2Config, batch_size: int, max_len: int | None = None) -> State:
    """Empty token buffer ``[B, S]`` at position 0 (S = max_len, at most max_seq_len)."""
    length = config.max_seq_len if max_len is None else max_len
    if not 1 <= length <= config.max_seq_len:
        raise ConfigError(
            f"init_state: max_len = {length} is invalid: allowed an int in "
            f"[1, max_seq_len={config.max_seq_len}]"
        )
    return {"pos": jnp.zeros((), jnp.int32), "tokens": jnp.zeros((batch_size, length), jnp.int32)}


def unused_original_params(config: QLLMv2Config) -> int:
    """Parameters the original allocates but never reads (not allocated here)."""
    c = config
    n = 64 * c.dim + c.vocab_size * 64  # semantic_clusters, cluster_assignments
    n += 2 + len(c.scales) + 1  # entanglement_strength, measurement_threshold, scales, window
    n += 9 * c.concept_dim  # language_gates rows 1..9
    n += c.dim - c.phase_dim  # phase_init beyond P
    return n + (0 if c.evolve else 1)  # quantum_uncertainty


def original_param_count(config: QLLMv2Config, params: Any) -> int:
    """The original's count for this config: our parameters plus the unused ones."""
    leaves = jax.tree.leaves(params)
    return sum(int(math.prod(x.shape)) for x in leaves) + unused_original_params(config)


# --------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class V2Preset(Preset):
    """A preset whose 256-byte vocabulary (the original's) also uses the byte tokenizer."""

    @property
    def tokenizer(self) -> str:
        return "byte" if self.model.vocab_size <= 259 else "gpt2"


_ORIGINAL = {"vocab_size": 256, "num_concepts": 512, "concept_dim": 256, "max_seq_len": 512}
# tiny/small/-byte match the transformer presets' parameter counts (13,191,552 /
# 63,493,120 / 689,664 / 12,377,600) within 4%: GPT-2-vocabulary presets need small
# per-token tables (K, C, P, a rank-r similarity) because the original keeps seven of them.
# processor_max_dim bounds the processors' levels (1024 upstream gives ~1M params per layer
# at small D, most of it in branches a batch never takes).
_SMALL_VOCAB = {"num_concepts": 32, "concept_dim": 32, "concept_heads": 4, "phase_dim": 16}
_TABLE: dict[str, tuple[dict[str, Any], int, float]] = {
    # name: (config fields, batch size, learning rate)
    "cli": ({**_ORIGINAL, "dim": 512, "num_layers": 8, "num_heads": 8, "phase_dim": 64}, 4, 3e-4),
    "run-training": (
        {
            **_ORIGINAL,
            "dim": 768,
            "num_layers": 12,
            "num_heads": 12,
            "phase_dim": 128,
            "use_checkpoint": True,
        },
        16,
        3e-4,
    ),
    "tiny": (
        {
            **_SMALL_VOCAB,
            "vocab_size": 50257,
            "dim": 80,
            "num_layers": 4,
            "num_heads": 2,
            "similarity_rank": 16,
            "processor_max_dim": 80,
            "max_seq_len": 1024,
        },
        16,
        1e-3,
    ),
    "small": (
        {
            "vocab_size": 50257,
            "dim": 480,
            "num_layers": 6,
            "num_heads": 2,
            "phase_dim": 32,
            "concept_dim": 64,
            "num_concepts": 64,
            "similarity_rank": 32,
            "processor_max_dim": 480,
            "max_seq_len": 1024,
        },
        8,
        6e-4,
    ),
    "tiny-byte": (
        {
            "vocab_size": 259,
            "dim": 96,
            "num_layers": 6,
            "num_heads": 2,
            "phase_dim": 16,
            "concept_dim": 32,
            "num_concepts": 64,
            "concept_heads": 4,
            "processor_max_dim": 145,
            "max_seq_len": 1024,
        },
        32,
        1e-3,
    ),
    "small-byte": (
        {
            "vocab_size": 259,
            "dim": 384,
            "num_layers": 10,
            "num_heads": 4,
            "phase_dim": 48,
            "concept_dim": 128,
            "num_concepts": 512,
            "processor_max_dim": 577,
            "max_seq_len": 1024,
        },
        16,
        6e-4,
    ),
    # Tests: prime-ish small shapes, one processor branch (levels 0) so every parameter is
    # on the path of every batch.
    "test": (
        {
            "vocab_size": 259,
            "dim": 24,
            "num_layers": 2,
            "num_heads": 2,
            "phase_dim": 7,
            "concept_dim": 16,
            "num_concepts": 13,
            "concept_heads": 2,
            "concept_blocks": 2,
            "processor_max_dim": 24,
            "max_seq_len": 64,
            "scales": (1, 2, 4),
            "context_window": 3,
            "semantic_window": 3,
        },
        8,
        1e-3,
    ),
}


def _preset(name: str, mode: str) -> V2Preset:
    fields, batch, lr = _TABLE[name]
    model = QLLMv2Config(**fields, mode=mode)
    suffix = "" if mode == "causal" else "-faithful"
    return V2Preset(name=name + suffix, model=model, batch_size=batch, learning_rate=lr)


PRESETS: dict[str, Preset] = {
    p.name: p for name in _TABLE for p in (_preset(name, "causal"), _preset(name, "faithful"))
}

QLLM_V2_FAMILY = ModelFamily(
    name="qllm_v2",
    config_cls=QLLMv2Config,
    build=lambda config: QLLMv2(config=config),
    init_state=init_state,
    presets=PRESETS,
    expected_leak=lambda config: (
        "faithful mode reproduces the original's future-token leaks (spec §A11)"
        if config.mode == "faithful"
        else ""
    ),
)
