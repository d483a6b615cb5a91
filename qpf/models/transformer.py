"""GPT-style decoder-only transformer baseline (family ``transformer``).

Data flow (pre-norm, as GPT-2 / nanodo)::

    tokens [B, T] -> embed [B, T, d] (+ learned positions) -> dropout
      -> L x { x += Drop(Attn(Norm(x)));  x += Drop(MLP(Norm(x))) }
      -> Norm -> LM head (tied: embedᵀ, untied: Dense) -> logits [B, T, V]

Attention is causal multi-head attention through ``jax.nn.dot_product_attention`` (its
logits and softmax are float32 even for bfloat16 inputs). Positions are rotary (default,
GPT-NeoX half-split convention, applied to queries and keys) or a learned table.
Weights are N(0, 0.02), residual output projections N(0, 0.02/sqrt(2L)) (GPT-2); no biases
in linear layers. Dropout acts on the embedding and on both residual branches; there is
no attention-probability dropout (``dot_product_attention`` has none).

Document resets (``segment_ids``, full forwards only): a query sees only keys of its own
document, and positions (rotary or learned) restart at 0 at every document start, so a
packed document gets the logits it would get alone.

Decoding state is a KV cache ``{"pos": int32 [], "k", "v": [L, B, S, H, Dh]}`` from
``init_state(config, batch, max_len)`` (S = max_len). A call with a state writes the
chunk's keys and values at ``pos`` and query i attends to cache slots <= pos + i. The cache
cannot grow: when pos + T > S the logits of that call are NaN (under jit the overflow cannot
raise, and ``dynamic_update_slice`` would otherwise clamp silently). A call without a state
is an ordinary causal forward; its returned state holds exactly the T positions it saw (a
full cache, so continue decoding from ``init_state`` with room instead).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.config import NumericsConfig, one_of, positive_int, require
from qpf.models.baseline_layers import DTYPES, norm, normal_002, output_head, validate_common
from qpf.models.contract import ModelOutput, State, applies_matmul_precision, kv_cache_state
from qpf.models.family import ModelFamily, Preset
from qpf.ops.segments import document_index, segment_positions

Array = jax.Array

POSITIONS = ("rotary", "learned")
INITS = ("gpt2", "torch")
ATTENTION_IMPLS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(NumericsConfig):
    """A GPT-style decoder.

    dim must be a multiple of num_heads; the head width dim/num_heads must be even for
    rotary positions. max_len bounds the positions of the learned table (and is the
    default cache length); rotary models accept any length without a state.
    mlp_ratio: MLP hidden width = mlp_ratio·dim (GELU). rope_base: rotary frequency base.
    attention_impl: ``jax.nn.dot_product_attention`` implementation; 'cudnn' needs a GPU
    and bfloat16/float16 compute.
    dtype: compute dtype of GEMMs (parameters stay ``param_dtype``); norms, attention
    logits and softmax are float32.
    use_bias: biases in the attention and MLP projections. gelu_exact: erf GELU instead of
    the tanh form. init: 'gpt2' (N(0, 0.02), residual projections scaled by 1/sqrt(2L)) or
    'torch' (PyTorch module defaults: N(0, 1) tables, Kaiming-uniform U(±1/sqrt(fan_in))
    linears and biases, Xavier-uniform fused q/k/v with zero bias, zero output-projection
    bias; the shared LM head keeps N(0, 0.02)). These serve the Wave-Native GPT's classic
    baseline (preset ``classic``, spec other_seeds §2.9).
    """

    family_name: ClassVar[str] = "transformer"  # its qpf.zoo family (not a field)

    vocab_size: int = 50257
    dim: int = 256
    num_layers: int = 8
    num_heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 1024
    positions: str = "rotary"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm: str = "rmsnorm"
    dropout: float = 0.1
    attention_impl: str = "xla"
    use_bias: bool = False
    gelu_exact: bool = False
    init: str = "gpt2"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common(self)
        one_of(self, "init", INITS)
        for flag in ("use_bias", "gelu_exact"):
            require(isinstance(getattr(self, flag), bool), self, flag, "a bool")
        positive_int(self, "num_heads", "mlp_ratio", "max_len")
        one_of(self, "positions", POSITIONS)
        one_of(self, "attention_impl", ATTENTION_IMPLS)
        require(self.dim % self.num_heads == 0, self, "num_heads", f"a divisor of dim={self.dim}")
        if self.positions == "rotary":
            require(
                (self.dim // self.num_heads) % 2 == 0,
                self,
                "num_heads",
                f"such that dim/num_heads is even for rotary positions (dim={self.dim})",
            )
        require(
            isinstance(self.rope_base, int | float) and self.rope_base > 1.0,
            self,
            "rope_base",
            "a number > 1",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def init_state(config: TransformerConfig, batch_size: int, max_len: int | None = None) -> State:
    """An empty KV cache at position 0: k/v ``[L, B, max_len, H, Dh]`` in the compute dtype."""
    return kv_cache_state(config, batch_size, max_len, (config.num_heads, config.head_dim))


def rotary(x: Array, positions: Array, base: float) -> Array:
    """Rotate feature pairs (i, i + Dh/2) by angle pos·base^(-2i/Dh), in float32.

    x ``[B, T, H, Dh]``, positions int ``[T]`` (or ``[B, T]``) -> ``[B, T, H, Dh]`` in x's dtype.
    """
    half = x.shape[-1] // 2
    acc = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = base ** (-jnp.arange(half, dtype=acc) * 2.0 / x.shape[-1])
    angles = positions.astype(acc)[..., None] * inv_freq  # [(B,) T, Dh/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # [.., T, 1, Dh/2]
    x1, x2 = x[..., :half].astype(acc), x[..., half:].astype(acc)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache.

    x ``[B, T, d]``, positions int ``[T]`` (absolute, for rotary; ``[B, T]`` per document),
    cache None or (k, v ``[B, S, H, Dh]``, pos int ``[]``) -> (y ``[B, T, d]``, (k, v)): the
    updated cache, or the chunk's own keys/values ``[B, T, H, Dh]`` without a cache.
    same_doc: bool ``[B, 1, T, T]`` (no cache): key visible to query only within a document.
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: tuple[Array, Array, Array] | None = None,
        same_doc: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        c = self.cfg
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        qkv = nn.DenseGeneral(
            (3, c.num_heads, c.head_dim),
            use_bias=c.use_bias,
            kernel_init=_uniform(math.sqrt(6.0 / (4 * c.dim))) if c.init == "torch" else normal_002,
            dtype=dt,
            param_dtype=pdt,
            name="qkv",
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
        if c.positions == "rotary":
            q, k = rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base)
        if cache is None:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=same_doc, is_causal=True, implementation=c.attention_impl
            )
            new_kv = (k, v)
        else:
            k_cache, v_cache, pos = cache
            start = (0, pos, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            # Query i (absolute position pos + i) sees cache slots 0 .. pos + i; slots past
            # it are stale or empty.
            slots = jnp.arange(k_cache.shape[1])
            mask = slots[None, :] <= positions[:, None]  # [T, S]
            out = jax.nn.dot_product_attention(
                q,
                k_cache.astype(q.dtype),
                v_cache.astype(q.dtype),
                mask=mask[None, None],
                implementation=c.attention_impl,
            )
            new_kv = (k_cache, v_cache)
        y = nn.DenseGeneral(
            c.dim,
            axis=(-2, -1),
            use_bias=c.use_bias,
            kernel_init=_residual_init(c, c.dim),
            dtype=dt,
            param_dtype=pdt,
            name="out",
        )(out)
        return y, new_kv


def _residual_init(c: TransformerConfig, fan_in: int) -> nn.initializers.Initializer:
    # GPT-2: residual-branch output projections scaled by 1/sqrt(2L) so the residual
    # stream's variance does not grow with depth at init.
    if c.init == "torch":
        return _uniform(1.0 / math.sqrt(fan_in))
    return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * c.num_layers))


def _uniform(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound) (torch's Kaiming-uniform default for nn.Linear is 1/sqrt(fan_in))."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _table_init(c: TransformerConfig) -> nn.initializers.Initializer:
    return nn.initializers.normal(1.0) if c.init == "torch" else normal_002


class MLP(nn.Module):
    """Dense(mlp_ratio·d) -> GELU (tanh form, as GPT-2) -> Dense(d). ``[B, T, d]``."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        kw = {
            "use_bias": c.use_bias,
            "dtype": DTYPES[c.dtype],
            "param_dtype": DTYPES[c.param_dtype],
        }
        hidden = c.mlp_ratio * c.dim
        up_init = _uniform(1.0 / math.sqrt(c.dim)) if c.init == "torch" else normal_002
        if c.init == "torch":
            kw["bias_init"] = up_init
        h = nn.Dense(hidden, kernel_init=up_init, name="up", **kw)(x)
        h = jax.nn.gelu(h, approximate=not c.gelu_exact)
        if c.init == "torch":
            kw["bias_init"] = _uniform(1.0 / math.sqrt(hidden))
        return nn.Dense(c.dim, kernel_init=_residual_init(c, hidden), name="down", **kw)(h)


class Block(nn.Module):
    """Pre-norm block: x + Drop(Attn(Norm x)), then + Drop(MLP(Norm x)). ``[B, T, d]``."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: tuple[Array, Array, Array] | None,
        deterministic: bool,
        same_doc: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        c = self.cfg
        drop = nn.Dropout(c.dropout)
        a, kv = CausalSelfAttention(c, name="attn")(
            norm(c, name="attn_norm")(x), positions, cache, same_doc
        )
        x = x + drop(a, deterministic=deterministic)
        m = MLP(c, name="mlp")(norm(c, name="mlp_norm")(x))
        return x + drop(m, deterministic=deterministic), kv


class Transformer(nn.Module):
    """The decoder; see the module docstring. Follows the ``ModelFamily`` call contract."""

    config: TransformerConfig

    @nn.compact
    @applies_matmul_precision
    def __call__(
        self,
        inputs: Array,
        state: State | None = None,
        *,
        deterministic: bool = True,
        return_features: bool = False,
        segment_ids: Array | None = None,
    ) -> ModelOutput:
        """inputs int ``[B, T]``, state None or a KV cache -> ModelOutput (logits ``[B, T, V]``;
        with ``return_features`` the final-norm output ``[B, T, d]`` and head weight instead).
        segment_ids: int ``[B, T]`` documents of a packed window (state None only): attention
        stays inside each document and positions restart at each document start."""
        c = self.config
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        t = inputs.shape[1]
        pos = jnp.zeros((), jnp.int32) if state is None else state["pos"]
        positions = pos + jnp.arange(t, dtype=jnp.int32)
        same_doc = None
        if segment_ids is not None:
            if state is not None:
                raise ValueError("segment_ids are for full forwards (state=None), not decoding")
            positions = segment_positions(segment_ids)  # [B, T]
            doc = document_index(segment_ids)  # an id that comes back is a new document
            same_doc = (doc[:, :, None] == doc[:, None, :])[:, None]
        if state is not None and t > state["k"].shape[2]:
            raise ValueError(f"chunk of {t} tokens exceeds the cache length {state['k'].shape[2]}")
        if c.positions == "learned" and state is None and t > c.max_len:
            raise ValueError(f"{t} tokens exceed max_len={c.max_len} of the learned positions")

        embed = nn.Embed(
            c.vocab_size,
            c.dim,
            embedding_init=_table_init(c),
            dtype=dt,
            param_dtype=pdt,
            name="embed",
        )
        x = embed(inputs)
        if c.positions == "learned":
            table = self.param("pos_embed", _table_init(c), (c.max_len, c.dim), pdt)
            # Positions past max_len (only reachable with a longer cache) make the
            # logits NaN below rather than silently reusing the last row.
            x = x + jnp.take(table, jnp.minimum(positions, c.max_len - 1), axis=0).astype(dt)
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)

        ks, vs = [], []
        for i in range(c.num_layers):
            cache = None if state is None else (state["k"][i], state["v"][i], pos)
            x, (k, v) = Block(c, name=f"blocks_{i}")(x, positions, cache, deterministic, same_doc)
            ks.append(k)
            vs.append(v)
        logits, features, weight = output_head(c, embed, x, dt, pdt, return_features)

        new_pos = pos + t
        if state is not None:
            ok = new_pos <= state["k"].shape[2]
            if c.positions == "learned":
                ok = ok & (new_pos <= c.max_len)
            # NaN features give NaN logits through the head as well.
            logits = None if logits is None else jnp.where(ok, logits, jnp.nan).astype(logits.dtype)
            if features is not None:
                features = jnp.where(ok, features, jnp.nan).astype(features.dtype)
        new_state = {"pos": new_pos, "k": jnp.stack(ks), "v": jnp.stack(vs)}
        return ModelOutput(
            logits=logits,
            phase_states=None,
            coupling_loss=jnp.zeros((), jnp.float32),
            state=new_state,
            features=features,
            head_weight=weight,
        )


# --------------------------------------------------------------------------- presets

# Sized to match the qpf preset of the same name within 10% of parameters (GPT-2 vocab
# 50257, tied head; byte presets: vocab 259). Heads are 64 wide (32 for tiny-byte).
# Batch sizes are qpf's (same tokens per step); learning rates are usual GPT values.
# name: (vocab, dim, layers, heads, batch size, learning rate)
_TABLE = {
    "tiny": (50257, 192, 8, 3, 16, 1e-3),
    "small": (50257, 512, 12, 8, 8, 6e-4),
    "medium": (50257, 768, 18, 12, 4, 3e-4),
    "large": (50257, 1024, 24, 16, 2, 2.5e-4),
    "tiny-byte": (259, 96, 6, 3, 32, 1e-3),
    "small-byte": (259, 320, 10, 5, 16, 6e-4),
}


def _preset(name: str) -> Preset:
    vocab, dim, layers, heads, batch, lr = _TABLE[name]
    model = TransformerConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads)
    return Preset(name=name, model=model, batch_size=batch, learning_rate=lr)


PRESETS: dict[str, Preset] = {name: _preset(name) for name in _TABLE}

# The Wave-Native GPT benchmark's classic baseline (its prototyping SpectralGPT, spec
# other_seeds §2.9): V 1024, d 384, L 8, H 8, T 256, learned positions, LayerNorm (eps 1e-5),
# biased projections, exact GELU, untied bias-free head, PyTorch default init; 15,081,216
# parameters. Its benchmark trained it with AdamW lr 3e-4, batch 32.
PRESETS["classic"] = Preset(
    name="classic",
    model=TransformerConfig(
        vocab_size=1024,
        dim=384,
        num_layers=8,
        num_heads=8,
        max_len=256,
        positions="learned",
        tie_embeddings=False,
        norm="torch_layernorm",
        use_bias=True,
        gelu_exact=True,
        init="torch",
    ),
    batch_size=32,
    learning_rate=3e-4,
)

# Tiny, prime-ish shapes that compile in seconds: the family-generic tests build this one.
TEST_PRESET = Preset(
    name="test",
    model=TransformerConfig(vocab_size=259, dim=12, num_layers=2, num_heads=3, max_len=37),
    batch_size=4,
    learning_rate=1e-2,
)

TRANSFORMER_FAMILY = ModelFamily(
    name="transformer",
    config_cls=TransformerConfig,
    build=lambda config: Transformer(config=config),
    init_state=init_state,
    presets={**PRESETS, "test": TEST_PRESET},
    segment_resets=lambda c: (
        "attention_impl='cudnn' takes no document mask; use attention_impl='xla'"
        if c.attention_impl == "cudnn"
        else ""
    ),
)
