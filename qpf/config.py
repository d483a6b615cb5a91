"""Frozen, validated configuration dataclasses for qpf models.

Every component that can be swapped is chosen by name (its ``type``); the name selects both
the config dataclass (here) and the Flax module (``qpf.registry``). A bad value raises
``ConfigError`` naming the field, the value and the allowed range.

Configs are plain frozen dataclasses of hashable values, so they can be static arguments of
``jax.jit`` and round-trip through JSON with ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Self, TypeVar, get_args

from qpf.errors import ConfigError
from qpf.ops.scan import SCAN_TYPES

T = TypeVar("T")


# Public validation helpers: every config's ``__post_init__`` (here, in the baselines and
# in qpf.training) states its constraints with these, so errors read the same everywhere:
# "<Class>.<field> = <value> is invalid: allowed <range>".


def require(cond: bool, obj: Any, field: str, allowed: str) -> None:
    """Unless ``cond``: a ``ConfigError`` naming ``obj``'s ``field``, its value and ``allowed``."""
    if not cond:
        value = getattr(obj, field)
        raise ConfigError(f"{type(obj).__name__}.{field} = {value!r} is invalid: allowed {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(obj: Any, *fields: str) -> None:
    """Each of ``fields`` is an int >= 1."""
    for f in fields:
        require(_is_int(getattr(obj, f)) and getattr(obj, f) > 0, obj, f, "an int >= 1")


def nonnegative_int(obj: Any, *fields: str) -> None:
    """Each of ``fields`` is an int >= 0."""
    for f in fields:
        require(_is_int(getattr(obj, f)) and getattr(obj, f) >= 0, obj, f, "an int >= 0")


def rate(obj: Any, *fields: str) -> None:
    """Each of ``fields`` is a float in [0, 1) (dropout rates)."""
    for f in fields:
        v = getattr(obj, f)
        require(isinstance(v, int | float) and 0.0 <= v < 1.0, obj, f, "a float in [0, 1)")


def one_of(obj: Any, field: str, choices: tuple[str, ...]) -> None:
    """``field`` is one of ``choices``."""
    require(getattr(obj, field) in choices, obj, field, f"one of {', '.join(choices)}")


# Precision of float32 matrix products (``jax.default_matmul_precision``): 'default' is the
# platform's (TF32 on recent NVIDIA GPUs), 'float32' / 'highest' full float32, 'tensorfloat32'
# / 'high' and 'bfloat16' faster and coarser. Every model config has a ``matmul_precision``.
MATMUL_PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16", "highest", "high")

# The former private names, for code written against them (new families on other branches).
_require, _positive_int, _rate, _one_of = require, positive_int, rate, one_of

# Names of the compute / parameter dtypes a model config may choose (``qpf.models.contract``
# maps them to jnp dtypes).
DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NumericsConfig:
    """The numeric fields every model config has, validated in one place.

    dtype: compute dtype of GEMMs (one of ``DTYPES``); norms, softmaxes and scans
      accumulate in float32 (float64 under x64) whatever it is.
    param_dtype: dtype the parameters are stored in (``DTYPES``).
    matmul_precision: precision of float32 matrix products (``MATMUL_PRECISIONS``).

    A family's config inherits it (``class FooConfig(NumericsConfig)``, also frozen) and
    its ``__post_init__`` calls ``super().__post_init__()`` first. The fields are
    keyword-only, so a subclass's own fields keep their positions; ``qpf.models.family``
    refuses a family whose config does not inherit this class.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    matmul_precision: str = "default"

    def __post_init__(self) -> None:
        self.validate_numerics()

    def validate_numerics(self) -> None:
        """``ConfigError`` naming the field unless dtype, param_dtype and matmul_precision
        are among ``DTYPES`` / ``MATMUL_PRECISIONS``."""
        one_of(self, "dtype", DTYPES)
        one_of(self, "param_dtype", DTYPES)
        one_of(self, "matmul_precision", MATMUL_PRECISIONS)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- banks


@dataclasses.dataclass(frozen=True)
class SemanticBankConfig:
    """Concept-attention bank (spec §6.1): softmax(2·cos) over a complex concept table."""

    type: Literal["semantic"] = "semantic"
    num_concepts: int = 512
    num_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        positive_int(self, "num_concepts")
        require(self.num_layers >= 0, self, "num_layers", "an int >= 0")
        rate(self, "dropout")


@dataclasses.dataclass(frozen=True)
class ContextBankConfig:
    """Causal windowed phase modulation (spec §6.2); the only stateful bank."""

    type: Literal["context"] = "context"
    window_size: int = 8
    num_layers: int = 2

    def __post_init__(self) -> None:
        positive_int(self, "window_size")
        require(self.num_layers >= 0, self, "num_layers", "an int >= 0")


@dataclasses.dataclass(frozen=True)
class LanguageBankConfig:
    """Per-language complex gate and projection (spec §6.3), chosen per batch row."""

    type: Literal["language"] = "language"
    num_languages: int = 16
    num_layers: int = 2

    def __post_init__(self) -> None:
        positive_int(self, "num_languages")
        require(self.num_layers >= 0, self, "num_layers", "an int >= 0")


@dataclasses.dataclass(frozen=True)
class EmotionBankConfig:
    """Soft emotion-prototype injection (spec §6.4)."""

    type: Literal["emotion"] = "emotion"
    num_emotions: int = 8

    def __post_init__(self) -> None:
        positive_int(self, "num_emotions")


@dataclasses.dataclass(frozen=True)
class MorphologyBankConfig:
    """Pattern attention plus rotated transform layers (spec §6.5)."""

    type: Literal["morphology"] = "morphology"
    num_patterns: int = 128
    num_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        positive_int(self, "num_patterns")
        require(self.num_layers >= 0, self, "num_layers", "an int >= 0")
        rate(self, "dropout")


@dataclasses.dataclass(frozen=True)
class OrthographyBankConfig:
    """Shape and script prototypes with real-gated layers (spec §6.6)."""

    type: Literal["orthography"] = "orthography"
    num_shape_patterns: int = 64
    num_script_classes: int = 16
    num_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        positive_int(self, "num_shape_patterns", "num_script_classes")
        require(self.num_layers >= 0, self, "num_layers", "an int >= 0")
        rate(self, "dropout")


BankConfig = (
    SemanticBankConfig
    | ContextBankConfig
    | LanguageBankConfig
    | EmotionBankConfig
    | MorphologyBankConfig
    | OrthographyBankConfig
)
BANK_CONFIGS: dict[str, type] = {
    c.__dataclass_fields__["type"].default: c for c in get_args(BankConfig)
}


# ----------------------------------------------------------------------- other parts


@dataclasses.dataclass(frozen=True)
class CouplerConfig:
    """Interference coupler (spec §7): per-bank projection, phase, routing, fusion."""

    type: Literal["interference"] = "interference"
    dynamic_routing: bool = True
    dropout: float = 0.1

    def __post_init__(self) -> None:
        one_of(self, "type", ("interference",))
        require(isinstance(self.dynamic_routing, bool), self, "dynamic_routing", "a bool")
        rate(self, "dropout")


SSM_TYPES = ("v4", "lru")
SELECTIVITIES = ("v4", "rglru", "none")
NORM_TYPES = ("v4", "rms")
ACTIVATIONS = ("v4", "modrelu", "modswish")
CHANNEL_MIXERS = ("none", "complex_glu", "geglu")
BLOCK_TYPES = ("v4", "griffin")
INIT_TYPES = ("v4", "orthogonal")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Oscillatory SSM stack (spec §8), with the v5 architecture options (issue 10).

    ``scan_type`` picks the recurrence backend (see ``qpf.ops.scan``); ``chunk_size`` is the
    chunk of the 'chunked' backend; ``unroll`` the lax.scan unroll of 'sequential'.
    ``remat`` recomputes each layer in the backward pass to save activation memory.

    v5 options (every default is the faithful v4; see ``qpf.ops.lru`` for the recurrences):
      ssm: 'v4' (δ·Cayley(skew) eigenvalues) or 'lru' (λ = exp(-exp(ν) + iθ), |λ| uniform in
        area on the ring [r_min, r_max], θ ~ U[0, max_phase], input scaled by √(1 - |λ|²)).
      selectivity: 'v4' (a_t = (1 - g_t)·λ, b_t = g_t·Bx_t), 'rglru' (log a_t = 8·r_t·log λ,
        input gate i_t, input scaled by √(1 - |a_t|²)) or 'none' (a_t = λ). Gates read the
        concatenated real and imaginary parts.
      norm: 'v4' (Phase2DLayerNorm) or 'rms' (phase-preserving complex RMS norm), for every
        norm of the stack.
      activation: 'v4' (the SSM output is linear; the complex GLU gate uses the v4 banks'
        GELU(Re u)·u), 'modrelu' or 'modswish' (applied to the SSM output and the complex GLU
        gate).
      channel_mixer: 'none' (v4), 'complex_glu' or 'geglu' (a real GeGLU on the concat
        layout), hidden width ``mlp_expansion``·dim complex (2·that real), after each SSM layer.
      conv_width: causal depthwise complex convolution of the SSM input before the
        recurrence (0 = off; 4 is Griffin's).
      block: 'v4' (h += γ_l·M_l(N_l h), M_l = SSM then, with a channel mixer, y += MLP(N'y);
        γ_l start at ``layer_scale_init``) or 'griffin' (h += SSM(N h); h += MLP(N' h); no
        layer scales, so ``layer_scale_init`` is unused).
      init: 'v4' (N(0, 0.02)) or 'orthogonal' (orthogonal matrices with Xavier gain
        √(2/(in + out)) per entry) for the stack's matrices.
    """

    type: Literal["oscillatory_ssm"] = "oscillatory_ssm"
    state_dim: int = 512
    num_layers: int = 8
    damping_init: float = 0.1
    layer_scale_init: float = 0.1
    dropout: float = 0.1
    scan_type: str = "sequential"
    chunk_size: int = 128
    unroll: int = 1
    remat: bool = False
    ssm: str = "v4"
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = 2 * math.pi
    selectivity: str = "v4"
    norm: str = "v4"
    activation: str = "v4"
    channel_mixer: str = "none"
    mlp_expansion: int = 2
    conv_width: int = 0
    block: str = "v4"
    init: str = "v4"

    def __post_init__(self) -> None:
        one_of(self, "type", ("oscillatory_ssm",))
        positive_int(self, "state_dim", "num_layers", "chunk_size", "unroll", "mlp_expansion")
        nonnegative_int(self, "conv_width")
        rate(self, "dropout")
        one_of(self, "scan_type", SCAN_TYPES)
        one_of(self, "ssm", SSM_TYPES)
        one_of(self, "selectivity", SELECTIVITIES)
        one_of(self, "norm", NORM_TYPES)
        one_of(self, "activation", ACTIVATIONS)
        one_of(self, "channel_mixer", CHANNEL_MIXERS)
        one_of(self, "block", BLOCK_TYPES)
        one_of(self, "init", INIT_TYPES)
        for f in ("r_min", "r_max"):
            v = getattr(self, f)
            require(isinstance(v, int | float) and 0.0 < v < 1.0, self, f, "a float in (0, 1)")
        require(self.r_min <= self.r_max, self, "r_min", f"<= r_max = {self.r_max}")
        v = self.max_phase
        require(isinstance(v, int | float) and 0.0 <= v <= 2 * math.pi, self, "max_phase",
                "a float in [0, 2π]")  # fmt: skip
        if self.scan_type == "pallas":
            # The fused kernel implements exactly v4's gated δ·Cayley recurrence.
            require(self.ssm == "v4" and self.selectivity == "v4", self, "scan_type",
                    "'pallas' only with ssm='v4' and selectivity='v4' (use 'chunked' or "
                    "'auto' for the other recurrences)")  # fmt: skip

    @property
    def v4_recurrence(self) -> bool:
        """Whether the recurrence is v4's gated δ·Cayley one (run by ``oscillatory_scan``)."""
        return self.ssm == "v4" and self.selectivity == "v4"


MATRIX_STATE_FORMS = ("chunked", "recurrent")


@dataclasses.dataclass(frozen=True)
class MatrixStateConfig:
    """Matrix-state phase-associative backbone (``qpf.layers.matrix_state``, issue 10).

    Per layer and head: S_t = γ_t·S_{t-1} + v_t k_t^H, y_t = S_t q_t with complex q, k, v of
    ``head_dim`` and γ_t = exp(−softplus(W·[Re x, Im x] + b)), b = ``gate_bias_init``
    (−4: γ ≈ 0.982, a memory of ~50 steps at init). ``form`` 'chunked' trains with the
    chunked parallel form (chunks of ``chunk_size``; single-step calls use the recurrence),
    'recurrent' always scans step by step (``unroll``). ``qk_norm`` scales q and k to unit
    complex norm per head, so |k^H q| <= 1 and the read is bounded by Σγ^n·|v|.

    ``local_attention_every`` = k > 0 makes every k-th layer (layers k-1, 2k-1, ...) a
    windowed causal attention layer (Griffin-style hybrid) over the last
    ``local_attention_window`` positions (self included), with ``num_heads`` heads of
    ``head_dim``; 0 disables it.
    """

    type: Literal["phase_matrix"] = "phase_matrix"
    num_heads: int = 4
    head_dim: int = 32
    num_layers: int = 8
    chunk_size: int = 64
    form: str = "chunked"
    gate_bias_init: float = -4.0
    qk_norm: bool = True
    layer_scale_init: float = 0.1
    dropout: float = 0.1
    unroll: int = 1
    remat: bool = False
    local_attention_every: int = 0
    local_attention_window: int = 64

    def __post_init__(self) -> None:
        one_of(self, "type", ("phase_matrix",))
        positive_int(self, "num_heads", "head_dim", "num_layers", "chunk_size", "unroll")
        positive_int(self, "local_attention_window")
        nonnegative_int(self, "local_attention_every")
        one_of(self, "form", MATRIX_STATE_FORMS)
        for f in ("gate_bias_init", "layer_scale_init"):
            v = getattr(self, f)
            require(isinstance(v, int | float) and not isinstance(v, bool), self, f, "a number")
        require(isinstance(self.qk_norm, bool), self, "qk_norm", "a bool")
        require(isinstance(self.remat, bool), self, "remat", "a bool")
        rate(self, "dropout")
        require(
            self.local_attention_every <= self.num_layers,
            self,
            "local_attention_every",
            f"0 (off) or 1..num_layers = {self.num_layers} (else no layer would be attention)",
        )

    def is_attention_layer(self, i: int) -> bool:
        """Whether layer ``i`` is a local-attention layer (every k-th: k-1, 2k-1, ...)."""
        k = self.local_attention_every
        return k > 0 and (i + 1) % k == 0


BackboneConfigs = BackboneConfig | MatrixStateConfig
BACKBONE_CONFIGS: dict[str, type] = {
    c.__dataclass_fields__["type"].default: c for c in get_args(BackboneConfigs)
}


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Phase-associative memory (spec §9): top-k cosine read over learned complex slots.

    ``key_chunk_size`` bounds the score block held at once: the [tokens, slots] matrix is
    never materialised when num_slots > key_chunk_size.
    """

    type: Literal["phase_associative"] = "phase_associative"
    num_slots: int = 512
    top_k: int = 32
    key_chunk_size: int = 2048
    scale_init: float = 0.1

    def __post_init__(self) -> None:
        one_of(self, "type", ("phase_associative",))
        positive_int(self, "num_slots", "top_k", "key_chunk_size")


EPISODIC_REGIMES = ("chunked", "sliding", "original")


@dataclasses.dataclass(frozen=True)
class EpisodicConfig:
    """Windowed single-head causal attention over the hidden states (spec §10).

    regime:
      'chunked'  - the original's rule for T > 2·window, for every length: queries in
                   aligned blocks of ``window`` see keys from the start of the previous block
                   up to (excluding) themselves (64-127 previous tokens). Streamable; what
                   every original training run (T = 256) computed.
      'sliding'  - each position sees exactly the previous ``window`` positions. Streamable.
      'original' - the original's length-dependent switch: for T <= 2·window full causal
                   attention *including* self with row 0 zeroed, else 'chunked'. Kept for
                   parity; it depends on the total length, so it cannot be streamed.
    """

    window: int = 64
    weight: float = 0.1
    regime: str = "chunked"

    def __post_init__(self) -> None:
        positive_int(self, "window")
        one_of(self, "regime", EPISODIC_REGIMES)


@dataclasses.dataclass(frozen=True)
class BytePatchConfig:
    """Fixed byte patches (spec §11) with a causal MegaByte-style within-patch decoder."""

    patch_size: int = 4
    decoder_layers: int = 2

    def __post_init__(self) -> None:
        positive_int(self, "patch_size")
        require(self.decoder_layers >= 0, self, "decoder_layers", "an int >= 0")


@dataclasses.dataclass(frozen=True)
class MorphologyEmbedConfig:
    """Vocabulary sizes of the root/prefix/suffix embedding (spec §5.3)."""

    root_vocab_size: int = 16000
    prefix_vocab_size: int = 512
    suffix_vocab_size: int = 512
    null_affix_id: int = 4

    def __post_init__(self) -> None:
        positive_int(self, "root_vocab_size", "prefix_vocab_size", "suffix_vocab_size")
        for f in ("prefix_vocab_size", "suffix_vocab_size"):
            require(getattr(self, f) > self.null_affix_id, self, f, "> null_affix_id")


INPUT_MODES = ("token", "byte_patch", "morphological")


@dataclasses.dataclass(frozen=True)
class ModelConfig(NumericsConfig):
    """The full v4 phase-field model.

    input_mode: 'token' (one id per position: BPE, or bytes without patching),
      'byte_patch' (bytes grouped into patches of ``byte_patch.patch_size``) or
      'morphological' (root, prefix, suffix ids per position, with affix heads).
    banks: run in this order; the order sets the router's inputs and the coupling pairs.
    memory / episodic: None disables the component.
    dtype: compute dtype of GEMMs (parameters stay ``param_dtype``); norms, softmaxes and
      the scan accumulate in float32.
    matmul_precision: precision of float32 matrix products (``MATMUL_PRECISIONS``).
    tie_embeddings: the LM head is the embedding tables, logit_v = Re(<z, e_v>), instead of
      its own ``[2d, V]`` kernel ('token' mode only; v4 unties them). At GPT-2 vocabulary
      this halves the embedding's share of the parameters.
    head_norm: the norm before the LM head, ``NORM_TYPES``: 'v4' (Phase2DLayerNorm, which
      subtracts the mean magnitude) or 'rms' (the phase-preserving complex RMS norm).
    """

    family_name: ClassVar[str] = "qpf"  # its qpf.zoo family (not a field)

    vocab_size: int = 50257
    dim: int = 256
    input_mode: str = "token"
    banks: tuple[BankConfig, ...] = (SemanticBankConfig(),)
    coupler: CouplerConfig = CouplerConfig()
    backbone: BackboneConfigs = BackboneConfig()
    memory: MemoryConfig | None = MemoryConfig()
    episodic: EpisodicConfig | None = EpisodicConfig()
    byte_patch: BytePatchConfig = BytePatchConfig()
    morphology: MorphologyEmbedConfig = MorphologyEmbedConfig()
    tie_embeddings: bool = False
    head_norm: str = "v4"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "vocab_size", "dim")
        one_of(self, "input_mode", INPUT_MODES)
        one_of(self, "head_norm", NORM_TYPES)
        require(
            not self.tie_embeddings or self.input_mode == "token",
            self,
            "tie_embeddings",
            "False unless input_mode is 'token' (byte patches and morphological ids have no "
            "per-token table to tie)",
        )
        require(isinstance(self.banks, tuple), self, "banks", "a tuple of bank configs")
        names = [b.type for b in self.banks]
        require(len(set(names)) == len(names), self, "banks", "distinct bank types")
        for b in self.banks:
            require(type(b) in BANK_CONFIGS.values(), self, "banks", "registered bank configs")
        require(
            type(self.backbone) in BACKBONE_CONFIGS.values(),
            self,
            "backbone",
            f"a backbone config of type {', '.join(BACKBONE_CONFIGS)}",
        )
        if self.input_mode == "byte_patch":
            require(self.vocab_size >= 259, self, "vocab_size", ">= 259 in byte_patch mode")

    @property
    def bank_names(self) -> tuple[str, ...]:
        return tuple(b.type for b in self.banks)


# ------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> Any:
    """A config dataclass (nested) -> plain JSON-able dicts and lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=globals())


def _decode(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        multi = len(options) > 1 and all(dataclasses.is_dataclass(a) for a in options)
        if multi and isinstance(value, Mapping):
            return _decode_union_dataclass(options, value, where)
        return _decode(options[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, where)
    if origin is Literal:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _decode_union_dataclass(options: list[type], value: Mapping, where: str) -> Any:
    by_type = {o.__dataclass_fields__["type"].default: o for o in options}
    name = value.get("type")
    if name not in by_type:
        raise ConfigError(f"{where}.type = {name!r} is unknown: allowed {', '.join(by_type)}")
    return from_dict(by_type[name], value, where)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build config ``cls`` from a (nested) mapping; unknown keys are an error."""
    where = where or cls.__name__
    hints = _resolve_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {sorted(unknown)}; allowed fields: {sorted(known)}"
        )
    kwargs = {k: _decode(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def apply_overrides(
    cfg: T, overrides: Mapping[str, str], parse: Callable[[str], Any] | None = None
) -> T:
    """Apply dotted ``key=value`` overrides (e.g. ``backbone.state_dim=64``) with validation.

    Values are parsed as JSON when possible (numbers, true/false, null, lists, objects), else
    taken as strings. ``banks=semantic,context`` is accepted as shorthand for default banks.
    """
    parse = parse or _parse_value
    data = to_dict(cfg)
    for key, raw in overrides.items():
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {key}: no field {'.'.join(parts[: i + 1])!r}")
            if node[part] is None:
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is disabled (null)")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"--set {key}: no field {key!r}")
        node[leaf] = _parse_banks(raw) if leaf == "banks" else parse(raw)
    return from_dict(type(cfg), data)


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_banks(raw: str) -> Any:
    value = _parse_value(raw)
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
        return [{"type": n} for n in names]
    return value
