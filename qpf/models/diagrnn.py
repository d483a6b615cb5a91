"""Real diagonal linear-recurrence baseline (family ``diagrnn``): "v4's backbone without
Phase2D, banks or memory", the DiagRNN SSM of the community evaluation (spec §20).

Data flow::

    tokens [B, T] -> embed [B, T, d]
      -> L x { x += γ_l · Drop(Layer_l(Norm_l(x), h_l)) }
      -> Norm -> LM head (tied: embedᵀ, untied: Dense) -> logits [B, T, V]

One layer (state width N = state_dim, default 2·d as qpf's backbone)::

    u_t = W_in x_t + b_in,  g_t = W_g x_t + b_g                  [B, T, N]
    λ   = exp(-softplus(ν))  ∈ (0, 1), learned per channel         [N]
    a_t = σ(g_t) · λ
    h_t = a_t ⊙ h_{t-1} + (1 - a_t) ⊙ u_t                          (float32)
    y_t = W_out h_t                                               [B, T, d]

The decay parameterisation keeps |a_t| < 1 for any ν, so the recurrence is stable by
construction; the (1 - a_t) input scale keeps h a convex combination of past inputs (no
growth for slow channels). ν is initialised so λ is spread uniformly over
[lambda_min, lambda_max] across channels (a range of time scales, as in LRU). γ_l is a
learnable scalar per layer starting at ``layer_scale_init`` (0.1, as qpf's backbone).

The recurrence runs through ``qpf.ops.scan.linear_scan`` (real mode) with the configured
backend. Document resets (``segment_ids``): the state carried into a document's first
position is zero, so a packed document gets the logits it would get alone. Decoding
state: ``{"pos": int32 [], "h": [L, B, N] float32}``, exact after any chunking of the
input; ``init_state`` ignores ``max_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.config import NumericsConfig, positive_int, require
from qpf.models.baseline_layers import DTYPES, norm, normal_002, output_head, validate_common
from qpf.models.contract import ModelOutput, State, applies_matmul_precision
from qpf.models.family import ModelFamily, Preset
from qpf.ops.scan import linear_scan
from qpf.ops.segments import segment_starts

Array = jax.Array

DIAGRNN_SCAN_TYPES = ("sequential", "associative", "chunked", "auto")


@dataclasses.dataclass(frozen=True)
class DiagRNNConfig(NumericsConfig):
    """A stack of real diagonal linear recurrences.

    state_dim: recurrence width N; None means 2·dim (qpf's backbone ratio).
    scan_type: 'sequential' | 'associative' | 'chunked' | 'auto' (see ``qpf.ops.scan``);
    chunk_size: chunk of the 'chunked' backend; unroll: lax.scan unroll of 'sequential'.
    lambda_min/lambda_max: range of the initial per-channel decay λ, 0 < min < max < 1.
    dtype: compute dtype of GEMMs; norms and the recurrence are float32.
    """

    family_name: ClassVar[str] = "diagrnn"  # its qpf.zoo family (not a field)

    vocab_size: int = 50257
    dim: int = 256
    num_layers: int = 8
    state_dim: int | None = None
    lambda_min: float = 0.9
    lambda_max: float = 0.999
    layer_scale_init: float = 0.1
    tie_embeddings: bool = True
    norm: str = "rmsnorm"
    dropout: float = 0.1
    scan_type: str = "sequential"
    chunk_size: int = 128
    unroll: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common(self)
        positive_int(self, "chunk_size", "unroll")
        if self.state_dim is not None:
            positive_int(self, "state_dim")
        require(
            self.scan_type in DIAGRNN_SCAN_TYPES,
            self,
            "scan_type",
            f"one of {', '.join(DIAGRNN_SCAN_TYPES)}",
        )
        require(
            isinstance(self.lambda_min, int | float) and self.lambda_min > 0.0,
            self,
            "lambda_min",
            "a float in (0, lambda_max)",
        )
        require(
            isinstance(self.lambda_max, int | float) and self.lambda_min < self.lambda_max < 1.0,
            self,
            "lambda_max",
            f"a float in (lambda_min={self.lambda_min}, 1)",
        )
        require(isinstance(self.layer_scale_init, int | float), self, "layer_scale_init", "a float")

    @property
    def state_width(self) -> int:
        """N: ``state_dim``, or 2·dim when unset."""
        return 2 * self.dim if self.state_dim is None else self.state_dim


def init_state(config: DiagRNNConfig, batch_size: int, max_len: int | None = None) -> State:
    """Zero state at position 0: h ``[L, B, N]`` float32 (max_len is not needed)."""
    del max_len  # a recurrent state does not grow with the context
    acc = jnp.promote_types(DTYPES[config.dtype], jnp.float32)
    h = jnp.zeros((config.num_layers, batch_size, config.state_width), acc)
    return {"pos": jnp.zeros((), jnp.int32), "h": h}


def decay_init(lambda_min: float, lambda_max: float) -> nn.initializers.Initializer:
    """ν with exp(-softplus(ν)) evenly spaced over [lambda_min, lambda_max] across channels."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        del key  # deterministic spread of time scales
        lam = jnp.linspace(lambda_min, lambda_max, shape[-1], dtype=jnp.float32)
        rate = -jnp.log(lam)  # softplus(ν) = -log λ > 0
        nu = jnp.log(jnp.expm1(rate))  # softplus⁻¹
        return jnp.broadcast_to(nu, shape).astype(dtype)

    return init


def decay(nu: Array) -> Array:
    """λ = exp(-softplus(ν)) ∈ (0, 1), in float32 (or float64)."""
    nu = nu.astype(jnp.promote_types(nu.dtype, jnp.float32))
    return jnp.exp(-jax.nn.softplus(nu))


class DiagRNNLayer(nn.Module):
    """One recurrence (see module docstring).

    x ``[B, T, d]`` (already normalised), h0 ``[B, N]``, resets bool ``[B, T]`` or None
    (document starts) -> (y ``[B, T, d]`` in x's dtype, h_T ``[B, N]`` float32).
    """

    cfg: DiagRNNConfig

    @nn.compact
    def __call__(self, x: Array, h0: Array, resets: Array | None = None) -> tuple[Array, Array]:
        c = self.cfg
        n = c.state_width
        kw = {"dtype": DTYPES[c.dtype], "param_dtype": DTYPES[c.param_dtype]}
        u = nn.Dense(n, kernel_init=normal_002, name="in_proj", **kw)(x)
        g = nn.Dense(n, kernel_init=normal_002, name="gate_proj", **kw)(x)
        nu = self.param("decay", decay_init(c.lambda_min, c.lambda_max), (n,), kw["param_dtype"])
        lam = decay(nu)
        acc = lam.dtype
        a = jax.nn.sigmoid(g.astype(acc)) * lam
        b = (1.0 - a) * u.astype(acc)
        h, h_last = linear_scan(
            a,
            b,
            h0,
            resets=resets,
            scan_type=c.scan_type,
            chunk_size=c.chunk_size,
            unroll=c.unroll,
            complex_pairs=False,
            out_dtype=x.dtype,
        )
        y = nn.Dense(c.dim, use_bias=False, kernel_init=normal_002, name="out_proj", **kw)(h)
        return y, h_last


class DiagRNN(nn.Module):
    """The model; see the module docstring. Follows the ``ModelFamily`` call contract."""

    config: DiagRNNConfig

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
        """inputs int ``[B, T]``, state None or ``init_state(...)`` -> ModelOutput (with
        ``return_features``: head input ``[B, T, d]`` and weight instead of logits).
        segment_ids: int ``[B, T]`` documents of a packed window: every recurrence resets
        where the id changes (None: no resets)."""
        c = self.config
        resets = None if segment_ids is None else segment_starts(segment_ids)
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        state = init_state(c, inputs.shape[0]) if state is None else state
        embed = nn.Embed(
            c.vocab_size, c.dim, embedding_init=normal_002, dtype=dt, param_dtype=pdt, name="embed"
        )
        scales = self.param(
            "layer_scales", nn.initializers.constant(c.layer_scale_init), (c.num_layers,), pdt
        )
        drop = nn.Dropout(c.dropout)
        x, finals = embed(inputs), []
        for i in range(c.num_layers):
            y, h_last = DiagRNNLayer(c, name=f"layers_{i}")(
                norm(c, name=f"norms_{i}")(x), state["h"][i], resets
            )
            y = drop(y, deterministic=deterministic)
            x = x + (scales[i].astype(dt) * y).astype(x.dtype)
            finals.append(h_last)
        logits, features, weight = output_head(c, embed, x, dt, pdt, return_features)
        return ModelOutput(
            logits=logits,
            phase_states=None,
            coupling_loss=jnp.zeros((), jnp.float32),
            state={"pos": state["pos"] + inputs.shape[1], "h": jnp.stack(finals)},
            features=features,
            head_weight=weight,
        )


# --------------------------------------------------------------------------- presets

# Same widths as the transformer presets and twice the layers (a DiagRNN layer has 6d²
# weights, a transformer block 12d²), so each matches the qpf preset of the same name
# within 10% of parameters. Batch sizes are qpf's; learning rates as the transformer's.
# name: (vocab, dim, layers, batch size, learning rate)
_TABLE = {
    "tiny": (50257, 192, 16, 16, 1e-3),
    "small": (50257, 512, 24, 8, 6e-4),
    "medium": (50257, 768, 36, 4, 3e-4),
    "large": (50257, 1024, 48, 2, 2.5e-4),
    "tiny-byte": (259, 96, 12, 32, 1e-3),
    "small-byte": (259, 320, 20, 16, 6e-4),
}


def _preset(name: str) -> Preset:
    vocab, dim, layers, batch, lr = _TABLE[name]
    model = DiagRNNConfig(vocab_size=vocab, dim=dim, num_layers=layers)
    return Preset(name=name, model=model, batch_size=batch, learning_rate=lr)


PRESETS: dict[str, Preset] = {name: _preset(name) for name in _TABLE}

# Tiny, prime-ish shapes that compile in seconds: the family-generic tests build this one
# (the chunked scan, so pieces that straddle chunk boundaries are exercised).
TEST_PRESET = Preset(
    name="test",
    model=DiagRNNConfig(
        vocab_size=259, dim=12, num_layers=2, state_dim=14, scan_type="chunked", chunk_size=5
    ),
    batch_size=4,
    learning_rate=1e-2,
)

DIAGRNN_FAMILY = ModelFamily(
    name="diagrnn",
    config_cls=DiagRNNConfig,
    build=lambda config: DiagRNN(config=config),
    init_state=init_state,
    presets={**PRESETS, "test": TEST_PRESET},
    segment_resets=lambda c: "",
)
