"""Load the original PyTorch v4 weights (torch state_dict names) into qpf parameters.

The golden fixtures in ``shared/fixtures`` store ``param/<torch name>`` arrays and the
original ``V4Config.to_dict()``. ``load_golden`` turns such a file into a qpf
``ModelConfig`` (faithful: episodic regime 'original', top-k 32) and a params pytree.

Conversions: torch ``[out, in]`` weights become ``[in, out]`` kernels; complex tables
``[n, d, 2]`` become planar ``[n, 2, d]``; the episodic projections, which act on the
original's interleaved layout, are permuted to act on qpf's concat layout. Parameters the
original created but never used are checked by name and dropped; any other leftover or
missing name is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from qpf import config as cfgs

Params = dict[str, Any]

# Parameters of the original that never influence its output (spec §22.17).
_DEAD_PATTERNS = (
    r"embed\.morph_embed\..*",  # morphological tables in BPE/byte mode
    r"banks\.semantic\.concept_proj\..*",
    r"memory\.slot_importance",
    r"banks\.morphology\.(prefix|suffix)_proj\..*",
    r"banks\.orthography\.position_encoding",
    r"coupler\.router\..*",  # dead with a single bank (checked below)
    r"coupler\.static_weights",
    r"(prefix|suffix)_proj\.weight",  # affix heads outside morphological mode
    r"slot_importance",  # module-level memory fixture
    r"(prefix|suffix)_proj\.(weight|bias)",  # module-level morphology bank fixture
    r"position_encoding",  # module-level orthography bank fixture
    r"(banks\.emotion\.)?emotion_detector\.bias_imag",  # only Re(detector) is used
)


class StateDict:
    """Reads torch-named arrays, remembering which ones were used."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.used: set[str] = set()

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"torch state_dict has no parameter {key!r}")
        self.used.add(key)
        return self.arrays[key]

    def has(self, key: str) -> bool:
        return key in self.arrays

    def check_all_used(self, dead_ok: tuple[str, ...] = _DEAD_PATTERNS) -> None:
        left = sorted(k for k in set(self.arrays) - self.used)
        unexpected = [k for k in left if not any(re.fullmatch(p, k) for p in dead_ok)]
        if unexpected:
            raise ValueError(f"torch parameters with no qpf counterpart: {unexpected}")


def _dotted(prefix: str, name: str) -> str:
    """The torch state_dict key ``prefix.name`` (just ``name`` at the top level)."""
    return f"{prefix}.{name}" if prefix else name


def linear(weights: StateDict, prefix: str) -> Params:
    """Phase2DLinear: weight_{real,imag} [out, in] -> kernel_{re,im} [in, out]."""
    p = {
        "kernel_re": weights(_dotted(prefix, "weight_real")).T,
        "kernel_im": weights(_dotted(prefix, "weight_imag")).T,
    }
    if weights.has(_dotted(prefix, "bias_real")):
        p["bias_re"] = weights(_dotted(prefix, "bias_real"))
        p["bias_im"] = weights(_dotted(prefix, "bias_imag"))
    return p


def dense(weights: StateDict, prefix: str) -> Params:
    """nn.Linear: weight [out, in] -> kernel [in, out]; bias if present."""
    p = {"kernel": weights(_dotted(prefix, "weight")).T}
    if weights.has(_dotted(prefix, "bias")):
        p["bias"] = weights(_dotted(prefix, "bias"))
    return p


def norm(weights: StateDict, prefix: str) -> Params:
    return {"scale": weights(_dotted(prefix, "scale"))}


def embed(weights: StateDict, prefix: str) -> Params:
    return {
        "embedding_re": weights(_dotted(prefix, "embed_real.weight")),
        "embedding_im": weights(_dotted(prefix, "embed_imag.weight")),
    }


def table(weights: StateDict, key: str) -> np.ndarray:
    """Complex table [..., d, 2] -> planar [..., 2, d]."""
    return np.swapaxes(weights(key), -1, -2)


def _stack_layers(weights: StateDict, prefix: str, n: int, fn) -> dict[str, Params]:
    return {f"layers_{i}": fn(weights, _dotted(prefix, f"layers.{i}")) for i in range(n)}


def _norms(weights: StateDict, prefix: str, n: int) -> dict[str, Params]:
    return {f"norms_{i}": norm(weights, _dotted(prefix, f"norms.{i}")) for i in range(n)}


def _output(weights: StateDict, prefix: str) -> Params:
    return {
        "output_proj": linear(weights, _dotted(prefix, "output_proj")),
        "output_norm": norm(weights, _dotted(prefix, "output_norm")),
    }


# ------------------------------------------------------------------------- banks


def semantic_bank(weights: StateDict, prefix: str, cfg: cfgs.SemanticBankConfig) -> Params:
    return {
        "concept_table": table(weights, _dotted(prefix, "concept_memory")),
        **_stack_layers(weights, prefix, cfg.num_layers, linear),
        **_norms(weights, prefix, cfg.num_layers),
        **_output(weights, prefix),
    }


def context_bank(weights: StateDict, prefix: str, cfg: cfgs.ContextBankConfig) -> Params:
    return {
        "window_weights": weights(_dotted(prefix, "window_weights")),
        "context_proj": linear(weights, _dotted(prefix, "context_proj")),
        "modulation_proj": linear(weights, _dotted(prefix, "modulation_proj")),
        **_stack_layers(weights, prefix, cfg.num_layers, linear),
        **_norms(weights, prefix, cfg.num_layers),
        **_output(weights, prefix),
    }


def language_bank(weights: StateDict, prefix: str, cfg: cfgs.LanguageBankConfig) -> Params:
    projs = [
        linear(weights, _dotted(prefix, f"language_projs.{i}")) for i in range(cfg.num_languages)
    ]
    stacked = {
        f"language_projs_{k}": np.stack([p[k] for p in projs])
        for k in ("kernel_re", "kernel_im", "bias_re", "bias_im")
    }
    return {
        "language_gates": table(weights, _dotted(prefix, "language_gates")),
        "universal_proj": linear(weights, _dotted(prefix, "universal_proj")),
        **stacked,
        **_stack_layers(weights, prefix, cfg.num_layers, linear),
        **_norms(weights, prefix, cfg.num_layers),
        **_output(weights, prefix),
    }


def real_part_of_linear(weights: StateDict, prefix: str) -> Params:
    """Re(Phase2DLinear(x)) as a real map of the concat layout: [W_r; -W_i] and b_r."""
    p = linear(weights, prefix)
    return {"kernel": np.concatenate([p["kernel_re"], -p["kernel_im"]], 0), "bias": p["bias_re"]}


def emotion_bank(weights: StateDict, prefix: str, cfg: cfgs.EmotionBankConfig) -> Params:
    return {
        "emotion_table": table(weights, _dotted(prefix, "emotion_embeds")),
        "emotion_detector": real_part_of_linear(weights, _dotted(prefix, "emotion_detector")),
        "proc": linear(weights, _dotted(prefix, "proc")),
        "norm": norm(weights, _dotted(prefix, "norm")),
    }


def morphology_bank(weights: StateDict, prefix: str, cfg: cfgs.MorphologyBankConfig) -> Params:
    p = {
        "pattern_table": table(weights, _dotted(prefix, "pattern_bank")),
        "pattern_detector": linear(weights, _dotted(prefix, "pattern_detector")),
        **_output(weights, prefix),
    }
    for i in range(cfg.num_layers):
        t = _dotted(prefix, f"transform_layers.{i}")
        p[f"transform_layers_{i}_norm"] = norm(weights, f"{t}.norm")
        p[f"transform_layers_{i}_rotation"] = {"skew": weights(f"{t}.rotation.skew_params")}
        p[f"transform_layers_{i}_linear"] = linear(weights, f"{t}.linear")
    return p


def orthography_bank(weights: StateDict, prefix: str, cfg: cfgs.OrthographyBankConfig) -> Params:
    p = {
        "shape_table": table(weights, _dotted(prefix, "shape_patterns")),
        "script_table": table(weights, _dotted(prefix, "script_embeddings")),
        "shape_detector": linear(weights, _dotted(prefix, "shape_detector")),
        "script_classifier": linear(weights, _dotted(prefix, "script_classifier")),
        **_output(weights, prefix),
    }
    for i in range(cfg.num_layers):
        t = _dotted(prefix, f"layers.{i}")
        p[f"layers_{i}_linear"] = linear(weights, f"{t}.linear")
        p[f"layers_{i}_norm"] = norm(weights, f"{t}.norm")
        p[f"layers_{i}_gate"] = dense(weights, f"{t}.gate")
    return p


BANK_CONVERTERS = {
    "semantic": semantic_bank,
    "context": context_bank,
    "language": language_bank,
    "emotion": emotion_bank,
    "morphology": morphology_bank,
    "orthography": orthography_bank,
}


# --------------------------------------------------------------- other components


def coupler(
    weights: StateDict, prefix: str, cfg: cfgs.CouplerConfig, names: tuple[str, ...]
) -> Params:
    p: Params = {
        "fusion": linear(weights, f"{prefix}.fusion"),
        "norm": norm(weights, f"{prefix}.norm"),
    }
    for n in names:
        p[f"bank_projs_{n}"] = linear(weights, f"{prefix}.bank_projs.{n}")
        p[f"interference_phases_{n}"] = table(weights, f"{prefix}.interference_phases.{n}")
    if len(names) > 1 and cfg.dynamic_routing:
        p["router_0"] = dense(weights, f"{prefix}.router.0")
        p["router_2"] = dense(weights, f"{prefix}.router.2")
    elif len(names) > 1:
        p["static_weights"] = weights(f"{prefix}.static_weights")
    return p


def ssm_layer(weights: StateDict, prefix: str) -> Params:
    return {
        "skew": weights(_dotted(prefix, "rotation.skew_params")),
        "damping": weights(_dotted(prefix, "damping_param")),
        "B": linear(weights, _dotted(prefix, "B")),
        "C": linear(weights, _dotted(prefix, "C")),
        "D": linear(weights, _dotted(prefix, "D")),
        "gate_proj": dense(weights, _dotted(prefix, "gate_proj")),
    }


def backbone(weights: StateDict, prefix: str, cfg: cfgs.BackboneConfig) -> Params:
    n = cfg.num_layers
    return {
        **{f"layers_{i}": ssm_layer(weights, f"{prefix}.layers.{i}") for i in range(n)},
        **_norms(weights, prefix, n),
        "output_norm": norm(weights, f"{prefix}.output_norm"),
        "layer_scales": np.stack([weights(f"{prefix}.layer_scales.{i}") for i in range(n)]),
    }


def memory(weights: StateDict, prefix: str) -> Params:
    return {
        "key_table": table(weights, _dotted(prefix, "keys")),
        "value_table": table(weights, _dotted(prefix, "values")),
        "query_proj": linear(weights, _dotted(prefix, "query_proj")),
        **_output(weights, prefix),
    }


def interleaved_to_concat(weight: np.ndarray) -> np.ndarray:
    """A torch [2d, 2d] weight on the interleaved layout -> a qpf [2d, 2d] concat kernel.

    Concat index j (re_j for j < d, im_{j-d} otherwise) sits at interleaved index perm[j];
    the map in concat coordinates is W[perm][:, perm], transposed to a [in, out] kernel.
    """
    d = weight.shape[0] // 2
    perm = np.concatenate([2 * np.arange(d), 2 * np.arange(d) + 1])
    return weight[np.ix_(perm, perm)].T


def episodic(weights: StateDict, prefix: str) -> Params:
    return {
        f"{n}_proj": {"kernel": interleaved_to_concat(weights(f"{prefix}.{n}_proj.weight"))}
        for n in ("query", "key", "value")
    }


def morph_embed(weights: StateDict, prefix: str) -> Params:
    return {
        "root_embed": embed(weights, _dotted(prefix, "root_embed")),
        "prefix_rotations": weights(_dotted(prefix, "prefix_rotations.rotation_params")),
        "suffix_rotations": weights(_dotted(prefix, "suffix_rotations.rotation_params")),
        "prefix_magnitude": weights(_dotted(prefix, "prefix_magnitude.weight")),
        "suffix_magnitude": weights(_dotted(prefix, "suffix_magnitude.weight")),
    }


def byte_patcher(weights: StateDict, prefix: str, patch_size: int) -> Params:
    return {
        "embed": embed(weights, _dotted(prefix, "byte_embed")),
        "position_weights": weights(_dotted(prefix, "position_weights")),
        **{
            f"position_proj_{i}": linear(weights, _dotted(prefix, f"position_proj.{i}"))
            for i in range(patch_size)
        },
        **_output(weights, prefix),
    }


# -------------------------------------------------------------------- full model


_IGNORED_BANK_PARAMS = {
    # Accepted by the original but never used by its forward pass (spec §6, §22.18).
    "context": {"dropout"},
    "language": {"dropout"},
    "emotion": {"dropout"},
    "morphology": {"use_affix_info"},
    "orthography": set(),
}


def config_from_torch(d: Mapping[str, Any], dtype: str = "float32") -> cfgs.ModelConfig:
    """The original ``V4Config.to_dict()`` -> a faithful qpf ``ModelConfig``.

    Faithful means: episodic regime 'original', memory top-k 32 (hard-coded upstream).
    Options qpf does not implement (the orthography bank's stub explicit-feature path)
    raise ``ConfigError``.
    """
    tok = d["tokenizer"]
    mode = tok["mode"]
    if mode == "byte" and tok["byte_patching"]["enabled"]:
        raise cfgs.ConfigError(
            "original byte-patching models cannot be loaded whole: their decoder leaks the "
            "target byte (spec §11.3); qpf's decoder is causal. Load the encoder with "
            "qpf.models.torch_weights.byte_patcher instead."
        )
    banks = []
    for name, b in d["banks"].items():
        if b["type"] != name:
            raise cfgs.ConfigError(f"bank {name!r} has type {b['type']!r}: qpf names banks by type")
        params = dict(b.get("params", {}))
        if params.pop("use_explicit_features", False):
            raise cfgs.ConfigError("orthography use_explicit_features=True is a stub upstream")
        for key in _IGNORED_BANK_PARAMS.get(b["type"], set()):
            params.pop(key, None)
        banks.append(cfgs.from_dict(cfgs.BANK_CONFIGS[b["type"]], {"type": b["type"], **params}))
    cp = d["coupler"]["params"]
    bp = d["backbone"]["params"]
    ep = d["episodic"]
    return cfgs.ModelConfig(
        vocab_size=d["vocab_size"],
        dim=d["dim"],
        input_mode="morphological" if mode == "morphological" else "token",
        banks=tuple(banks),
        coupler=cfgs.CouplerConfig(
            dynamic_routing=cp.get("use_dynamic_routing", True), dropout=cp.get("dropout", 0.1)
        ),
        backbone=cfgs.BackboneConfig(
            state_dim=d["backbone"]["state_dim"],
            num_layers=d["backbone"]["num_layers"],
            damping_init=bp.get("damping_init", 0.1),
            dropout=bp.get("dropout", 0.1),
            chunk_size=bp.get("chunk_size", 128),
        ),
        memory=cfgs.MemoryConfig(num_slots=d["memory"]["num_slots"], top_k=32),
        episodic=(
            cfgs.EpisodicConfig(window=ep["buffer_size"], weight=ep["weight"], regime="original")
            if ep["enabled"]
            else None
        ),
        morphology=cfgs.MorphologyEmbedConfig(
            root_vocab_size=tok["root_vocab_size"],
            prefix_vocab_size=tok["prefix_vocab_size"],
            suffix_vocab_size=tok["suffix_vocab_size"],
        ),
        dtype=dtype,
        param_dtype=dtype,
    )


def model_params(weights: StateDict, config: cfgs.ModelConfig) -> Params:
    """All qpf parameters of ``config`` from the original's state_dict (torch names)."""
    p: Params = {}
    if config.input_mode == "morphological":
        p["embed"] = morph_embed(weights, "embed.morph_embed")
        p["prefix_head"] = dense(weights, "prefix_proj")
        p["suffix_head"] = dense(weights, "suffix_proj")
    else:
        p["embed"] = embed(weights, "embed.bpe_embed")
    for b in config.banks:
        p[f"banks_{b.type}"] = BANK_CONVERTERS[b.type](weights, f"banks.{b.type}", b)
    if config.banks:
        p["coupler"] = coupler(weights, "coupler", config.coupler, config.bank_names)
    p["backbone"] = backbone(weights, "backbone", config.backbone)
    if config.memory is not None:
        p["memory"] = memory(weights, "memory")
        p["memory_scale"] = weights("memory_scale")
    if config.episodic is not None:
        p["episodic"] = episodic(weights, "episodic")
    p["head_proj"] = linear(weights, "lm_head.0")
    p["head_norm"] = norm(weights, "lm_head.1")
    p["output_proj"] = dense(weights, "output_proj")
    weights.check_all_used()
    return p


def state_dict_from_npz(z: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``param/<torch name>`` entries of a fixture file -> {torch name: array}."""
    return {k[len("param/") :]: z[k] for k in z if k.startswith("param/")}


def load_golden(
    z: Mapping[str, np.ndarray], dtype: str = "float32"
) -> tuple[cfgs.ModelConfig, Params]:
    """A full-model golden fixture (opened npz) -> (qpf config, qpf params in ``dtype``)."""
    config = config_from_torch(json.loads(str(z["config_json"])), dtype=dtype)
    params = model_params(StateDict(state_dict_from_npz(z)), config)
    return config, cast_params(params, dtype)


def cast_params(params: Params, dtype: str) -> Params:
    """Cast every leaf of a nested params dict to ``dtype`` (numpy arrays)."""
    if isinstance(params, dict):
        return {k: cast_params(v, dtype) for k, v in params.items()}
    return np.asarray(params, dtype=jnp.dtype(dtype))
