"""Wave-Native GPT (family ``wavegpt``): a port of ``spectral_gpt/wave_gpt.py`` at ``c04e261``
(the README's headline code) plus the pure-wave attention of ``d774ebc`` (spec §2.4-2.8).

Data flow::

    tokens [B, T] -> WavePacketEmbedding: LN(ρ·Dense([A sin θ; A cos θ]) + (1-ρ)·E[t])  [B, T, d]
      -> L x { x += Attn(LN1 x);  x += MLP(LN2 x) }        (pre-LN, no residual dropout)
      -> CollapseHead: LN -> Dense(V, with bias) -> logits [B, T, V]

θ_{w,h} = 2π·f_{t,w}·h + φ_{t,w} + p·ω_w (p = absolute position), ρ = sigmoid(wave_ratio).
Attention is one of:

* ``interference`` (default, the headline model): q, k = Dense(H·W) + per-head phase offsets,
  L2-normalised over W; softmax(q̂·k̂/τ) with one learned τ per layer (init √W); causal.
* ``pure_wave``: q̂ = normalize(sin(q_f·t + q_p))·W^¼ (k̂ likewise, t = absolute position),
  with ``wave_mode``:
  - ``quadratic`` (what the original always ran): A = κ(q̂·k̂·scale_h) causal, row i / √(i+1);
  - ``linear``: causal linear attention with feature map φ = κ on q̂ and k̂ separately,
    y_i = φq_i·Σ_{j<=i} φk_j v_jᵀ / (φq_i·Σ_{j<=i} φk_j + 1e-6), in O(T) with a recurrent
    state. This is the original's ``mode='linear'`` function, which its ``WaveBlock`` never
    reached (it passes the kernel but not the mode, spec §2.6).

MLP: fc2(Drop(GELU(h) + 0.1·sin h)), h = fc1(x), then dropout; GELU exact (erf). Dropout
also acts on the attention weights of the quadratic forms. LayerNorm eps 1e-5.

Init (the original at ``c04e261``): every Dense N(0, 0.02), zero bias; ``simple_embed`` keeps
N(0, 1) (the 0.02 embedding init arrived in ``4faf2f7``); base frequencies linspace(0.5, 5, W)
+ N(0, 0.1²); harmonic amplitudes N(0, 1)·0.5/√(Hh·W); phases U(0, 2π); ω N(0, 0.1²);
wave_ratio 0.5; τ = √W; phase offsets 0; interference scales 1.

Decoding state (``init_state``): ``{"pos": int32 [], "k": [L, B, S, H, W], "v":
[L, B, S, H, D]}`` (normalised keys and values; S = max_len) for the quadratic forms, and
``{"pos", "s": [L, B, H, W, D], "z": [L, B, H, W]}`` (running sums) for the linear form.
Positions are unbounded (no position table); a KV cache cannot grow: when pos + T > S the
logits of that call are NaN. A call without a state is an ordinary causal forward; its
returned state holds the T positions it saw.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.config import NumericsConfig, one_of, positive_int, rate, require
from qpf.models.contract import DTYPES, ModelOutput, applies_matmul_precision, kv_cache_state
from qpf.models.family import ModelFamily, Preset, State
from qpf.ops import wave as wv

Array = jax.Array

ATTENTIONS = ("interference", "pure_wave")
WAVE_MODES = ("quadratic", "linear")
LN_EPS = 1e-5

normal_002 = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class WaveGPTConfig(NumericsConfig):
    """A Wave-Native GPT.

    dim (the original's d_model) must be a multiple of num_heads. num_waves W: waves per
    token and per attention head; num_harmonics Hh: harmonics per wave. max_len: the
    original's block_size (crop length of its generation; default KV-cache length here).
    attention: 'interference' | 'pure_wave'; kernel (pure_wave): 'elu_plus_one' | 'sigmoid'
    | 'exp' | 'identity' (identity: raw masked scores, quadratic mode only); wave_mode
    (pure_wave): 'quadratic' | 'linear'. linear_chunk: chunk of the linear form's scan.
    matmul_precision: precision of float32 matrix products (``qpf.config.MATMUL_PRECISIONS``).
    dtype: compute dtype of the dense layers; trigonometry, norms, softmax and running sums
    are float32.
    """

    family_name: ClassVar[str] = "wavegpt"  # its qpf.zoo family (not a field)

    vocab_size: int = 50257
    dim: int = 384
    num_layers: int = 8
    num_heads: int = 8
    num_waves: int = 48
    num_harmonics: int = 4
    max_len: int = 256
    dropout: float = 0.1
    attention: str = "interference"
    kernel: str = "elu_plus_one"
    wave_mode: str = "quadratic"
    linear_chunk: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(
            self,
            "vocab_size",
            "dim",
            "num_layers",
            "num_heads",
            "num_waves",
            "num_harmonics",
            "max_len",
            "linear_chunk",
        )
        rate(self, "dropout")
        one_of(self, "attention", ATTENTIONS)
        one_of(self, "kernel", wv.KERNELS)
        one_of(self, "wave_mode", WAVE_MODES)
        require(self.dim % self.num_heads == 0, self, "num_heads", f"a divisor of dim={self.dim}")
        require(
            not (self.linear and self.kernel == "identity"),
            self,
            "kernel",
            f"one of {', '.join(wv.LINEAR_KERNELS)} with wave_mode='linear'",
        )
        require(
            self.attention == "pure_wave" or self.wave_mode == "quadratic",
            self,
            "wave_mode",
            "'quadratic' with attention='interference' (linear is a pure_wave form)",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def linear(self) -> bool:
        return self.attention == "pure_wave" and self.wave_mode == "linear"


def init_state(config: WaveGPTConfig, batch_size: int, max_len: int | None = None) -> State:
    """Empty decoding state at position 0 (KV cache of ``max_len`` slots, or running sums)."""
    c = config
    acc = wv.acc_dtype(DTYPES[c.dtype])
    pos = jnp.zeros((), jnp.int32)
    lb = (c.num_layers, batch_size)
    if c.linear:
        return {
            "pos": pos,
            "s": jnp.zeros((*lb, c.num_heads, c.num_waves, c.head_dim), acc),
            "z": jnp.zeros((*lb, c.num_heads, c.num_waves), acc),
        }
    keys, values = (c.num_heads, c.num_waves), (c.num_heads, c.head_dim)
    return kv_cache_state(c, batch_size, max_len, keys, values, acc, DTYPES[c.dtype])


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (eps 1e-5, statistics in float32). ``[..., d]``."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        acc = wv.acc_dtype(x.dtype)
        xf = x.astype(acc)
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        mu = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + LN_EPS) * scale.astype(acc) + bias.astype(acc)
        return y.astype(x.dtype)


def _dense(c: WaveGPTConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=normal_002,
        dtype=DTYPES[c.dtype],
        param_dtype=DTYPES[c.param_dtype],
        name=name,
    )


def _base_freq_init(key: Array, shape: tuple[int, int], dtype: Any) -> Array:
    base = jnp.linspace(0.5, 5.0, shape[1], dtype=dtype)
    return base[None, :] + 0.1 * jax.random.normal(key, shape, dtype)


class WavePacketEmbedding(nn.Module):
    """ids ``[B, T]``, positions ``[T]`` -> ``[B, T, d]`` (see the module docstring).

    With ``sow_intermediates`` the stages are sown into 'intermediates' for parity checks.
    """

    cfg: WaveGPTConfig

    @nn.compact
    def __call__(self, ids: Array, positions: Array) -> Array:
        c = self.cfg
        pdt, dt = DTYPES[c.param_dtype], DTYPES[c.dtype]
        v, w, hh = c.vocab_size, c.num_waves, c.num_harmonics
        base_freqs = self.param("base_freqs", _base_freq_init, (v, w), pdt)
        amp_std = 0.5 / math.sqrt(hh * w)
        harmonic_amps = self.param(
            "harmonic_amps", nn.initializers.normal(stddev=amp_std), (v, w, hh), pdt
        )
        phases = self.param(
            "phases", lambda k, s, d: jax.random.uniform(k, s, d, 0.0, 2 * math.pi), (v, w), pdt
        )
        pos_freq = self.param("pos_freq", nn.initializers.normal(stddev=0.1), (1, 1, w), pdt)
        wave_ratio = self.param("wave_ratio", nn.initializers.constant(0.5), (), pdt)
        state = wv.wave_state(
            ids, positions, base_freqs, harmonic_amps, phases, pos_freq.reshape(w)
        )
        self.sow("intermediates", "wave_state", state)
        wave = _dense(c, c.dim, "wave_to_embed")(state.astype(dt))
        simple = nn.Embed(
            v,
            c.dim,
            embedding_init=nn.initializers.normal(1.0),
            dtype=dt,
            param_dtype=pdt,
            name="simple_embed",
        )(ids)
        acc = wv.acc_dtype(dt)
        rho = jax.nn.sigmoid(wave_ratio.astype(acc))
        mixed = rho * wave.astype(acc) + (1.0 - rho) * simple.astype(acc)
        self.sow("intermediates", "wave_embed", wave)
        self.sow("intermediates", "simple", simple)
        self.sow("intermediates", "mixed", mixed)
        return LayerNorm(pdt, name="ln")(mixed.astype(dt))


def _heads(x: Array, h: int) -> Array:
    return x.reshape(*x.shape[:-1], h, x.shape[-1] // h)


def _write_cache(cache: Array, new: Array, pos: Array) -> Array:
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, pos, 0, 0))


class WaveAttention(nn.Module):
    """Interference or pure-wave attention with its decoding state.

    x ``[B, T, d]``, positions int ``[T]`` (absolute), layer state None or a dict of this
    layer's slices (k/v ``[B, S, ...]`` + pos, or s/z) -> (y ``[B, T, d]``, new layer state).
    """

    cfg: WaveGPTConfig

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, st: dict[str, Array] | None, deterministic: bool
    ) -> tuple[Array, dict[str, Array]]:
        c = self.cfg
        h, w = c.num_heads, c.num_waves
        pdt = DTYPES[c.param_dtype]
        v = _heads(_dense(c, c.dim, "v_proj")(x), h)  # [B, T, H, D]
        if c.attention == "interference":
            q = _heads(_dense(c, h * w, "q_proj")(x), h)
            k = _heads(_dense(c, h * w, "k_proj")(x), h)
            q_phase = self.param("q_phase", nn.initializers.zeros, (1, h, 1, w), pdt)
            k_phase = self.param("k_phase", nn.initializers.zeros, (1, h, 1, w), pdt)
            temp = self.param("temperature", nn.initializers.constant(math.sqrt(w)), (1,), pdt)
            q_feat = wv.l2_normalize(q.astype(wv.acc_dtype(q.dtype)) + q_phase.reshape(h, w))
            k_feat = wv.l2_normalize(k.astype(wv.acc_dtype(k.dtype)) + k_phase.reshape(h, w))
        else:
            q_feat = wv.pure_wave_features(
                _heads(_dense(c, h * w, "q_freq")(x), h),
                _heads(_dense(c, h * w, "q_phase")(x), h),
                positions,
            )
            k_feat = wv.pure_wave_features(
                _heads(_dense(c, h * w, "k_freq")(x), h),
                _heads(_dense(c, h * w, "k_phase")(x), h),
                positions,
            )
            if not c.linear:  # the original's linear form has no interference scale
                scale = self.param(
                    "interference_scale", nn.initializers.ones, (h, 1, 1), pdt
                ).reshape(h)

        if c.linear:
            carry = None if st is None else (st["s"], st["z"])
            y, (s, z) = wv.causal_linear_attention(
                wv.linear_features(q_feat, c.kernel),
                wv.linear_features(k_feat, c.kernel),
                v,
                carry,
                c.linear_chunk,
            )
            new_st = {"s": s, "z": z}
        else:
            if st is None:
                keys, vals, k_pos = k_feat, v, positions
            else:
                keys = _write_cache(st["k"], k_feat, st["pos"])
                vals = _write_cache(st["v"], v, st["pos"])
                k_pos = jnp.arange(keys.shape[1], dtype=jnp.int32)
            if c.attention == "interference":
                probs = wv.interference_weights(
                    q_feat, keys, temp.reshape(()), wv.causal_mask(positions, k_pos)
                )
            else:
                probs = wv.pure_wave_weights(q_feat, keys, scale, c.kernel, positions, k_pos)
            self.sow("intermediates", "attn_probs", probs)
            probs = nn.Dropout(c.dropout)(probs, deterministic=deterministic)
            y = wv.attend(probs, vals)
            new_st = {"k": keys, "v": vals}
        y = y.reshape(*y.shape[:2], c.dim).astype(DTYPES[c.dtype])
        return _dense(c, c.dim, "o_proj")(y), new_st


class ResonanceMLP(nn.Module):
    """fc1 -> GELU(h) + 0.1·sin(h) -> dropout -> fc2 -> dropout. ``[B, T, d]``."""

    cfg: WaveGPTConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.cfg
        drop = nn.Dropout(c.dropout)
        h = _dense(c, 4 * c.dim, "fc1")(x)
        hf = h.astype(wv.acc_dtype(h.dtype))
        h = (jax.nn.gelu(hf, approximate=False) + 0.1 * jnp.sin(hf)).astype(h.dtype)
        h = drop(h, deterministic=deterministic)
        return drop(_dense(c, c.dim, "fc2")(h), deterministic=deterministic)


class WaveBlock(nn.Module):
    """Pre-LN block: x + Attn(LN1 x), then + MLP(LN2 x). ``[B, T, d]``."""

    cfg: WaveGPTConfig

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, st: dict[str, Array] | None, deterministic: bool
    ) -> tuple[Array, dict[str, Array]]:
        c = self.cfg
        pdt = DTYPES[c.param_dtype]
        h1 = LayerNorm(pdt, name="ln1")(x)
        a, new_st = WaveAttention(c, name="attn")(h1, positions, st, deterministic)
        x = x + a
        h2 = LayerNorm(pdt, name="ln2")(x)
        m = ResonanceMLP(c, name="mlp")(h2, deterministic)
        for key, val in (("ln1_out", h1), ("attn_out", a), ("ln2_out", h2), ("mlp_out", m)):
            self.sow("intermediates", key, val)
        return x + m, new_st


class WaveGPT(nn.Module):
    """The model; see the module docstring. Follows the ``ModelFamily`` call contract."""

    config: WaveGPTConfig

    @nn.compact
    @applies_matmul_precision
    def __call__(
        self, inputs: Array, state: State | None = None, *, deterministic: bool = True
    ) -> ModelOutput:
        """inputs int ``[B, T]``, state None or a decoding state -> ModelOutput."""
        c = self.config
        t = inputs.shape[1]
        pos = jnp.zeros((), jnp.int32) if state is None else state["pos"]
        positions = pos + jnp.arange(t, dtype=jnp.int32)
        if state is not None and not c.linear and t > state["k"].shape[2]:
            raise ValueError(f"chunk of {t} tokens exceeds the cache length {state['k'].shape[2]}")
        x = WavePacketEmbedding(c, name="embedding")(inputs, positions)
        self.sow("intermediates", "embed_out", x)
        layer_states = []
        for i in range(c.num_layers):
            st = None if state is None else _layer_state(state, i)
            x, new_st = WaveBlock(c, name=f"blocks_{i}")(x, positions, st, deterministic)
            self.sow("intermediates", f"block_out_{i}", x)
            layer_states.append(new_st)
        hx = LayerNorm(DTYPES[c.param_dtype], name="head_ln")(x)
        self.sow("intermediates", "head_ln_out", hx)
        logits = _dense(c, c.vocab_size, "head_proj")(hx)

        new_pos = pos + t
        if state is not None and not c.linear:
            logits = jnp.where(new_pos <= state["k"].shape[2], logits, jnp.nan).astype(logits.dtype)
        new_state = {"pos": new_pos}
        for key in layer_states[0]:
            new_state[key] = jnp.stack([s[key] for s in layer_states])
        return ModelOutput(
            logits=logits,
            phase_states=None,
            coupling_loss=jnp.zeros((), jnp.float32),
            state=new_state,
        )


def _layer_state(state: State, i: int) -> dict[str, Array]:
    out = {k: v[i] for k, v in state.items() if k != "pos"}
    out["pos"] = state["pos"]
    return out


# --------------------------------------------------------------------------- presets


def count_params(c: WaveGPTConfig) -> int:
    """Parameter count from the config alone (the fixture's ``n_params`` formula)."""
    d, v, w, hh, h = c.dim, c.vocab_size, c.num_waves, c.num_harmonics, c.num_heads
    embed = v * w * (2 + hh) + w + 1 + (2 * w * hh * d + d) + v * d + 2 * d
    if c.attention == "interference":
        attn = 2 * (d * h * w + h * w) + 2 * h * w + 1
    else:
        attn = 4 * (d * h * w + h * w) + h
    attn += 2 * (d * d + d)
    block = 4 * d + attn + (4 * d * d + 4 * d) + (4 * d * d + d)
    return embed + c.num_layers * block + 2 * d + v * d + v


# name: (vocab, dim, layers, heads, waves, harmonics, max_len, batch size, learning rate)
# orig-*: the original's ablation sizes (spec §2.13); orig-small is also the benchmark model
# (15,433,657 params). tiny/small(-byte): matched within 4% to the transformer presets of
# the same name (13,191,552 / 63,493,120 / 689,664 / 12,377,600). test: for unit tests.
_TABLE = {
    "orig-small": (1024, 384, 8, 8, 48, 4, 256, 32, 6e-4),
    "orig-medium": (8192, 512, 10, 8, 64, 4, 384, 24, 6e-4),
    "orig-large": (32000, 768, 12, 12, 96, 4, 512, 16, 6e-4),
    "tiny": (50257, 96, 11, 3, 8, 4, 1024, 16, 1e-3),
    "small": (50257, 384, 9, 8, 32, 4, 1024, 8, 6e-4),
    "tiny-byte": (259, 64, 10, 4, 32, 4, 1024, 32, 1e-3),
    "small-byte": (259, 320, 10, 4, 64, 4, 1024, 16, 6e-4),
    "test": (259, 24, 2, 3, 5, 3, 64, 4, 1e-3),
}


def _preset(name: str) -> Preset:
    vocab, dim, layers, heads, waves, harm, max_len, batch, lr = _TABLE[name]
    model = WaveGPTConfig(
        vocab_size=vocab,
        dim=dim,
        num_layers=layers,
        num_heads=heads,
        num_waves=waves,
        num_harmonics=harm,
        max_len=max_len,
    )
    return Preset(name=name, model=model, batch_size=batch, learning_rate=lr)


PRESETS: dict[str, Preset] = {name: _preset(name) for name in _TABLE}

WAVEGPT_FAMILY = ModelFamily(
    name="wavegpt",
    config_cls=WaveGPTConfig,
    build=lambda config: WaveGPT(config=config),
    init_state=init_state,
    presets=PRESETS,
)
