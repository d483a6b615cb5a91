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


def _j(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def linear(sd: StateDict, prefix: str) -> Params:
    """Phase2DLinear: weight_{real,imag} [out, in] -> kernel_{re,im} [in, out]."""
    p = {
        "kernel_re": sd(_j(prefix, "weight_real")).T,
        "kernel_im": sd(_j(prefix, "weight_imag")).T,
    }
    if sd.has(_j(prefix, "bias_real")):
        p["bias_re"] = sd(_j(prefix, "bias_real"))
        p["bias_im"] = sd(_j(prefix, "bias_imag"))
    return p


def dense(sd: StateDict, prefix: str) -> Params:
    """nn.Linear: weight [out, in] -> kernel [in, out]; bias if present."""
    p = {"kernel": sd(_j(prefix, "weight")).T}
    if sd.has(_j(prefix, "bias")):
        p["bias"] = sd(_j(prefix, "bias"))
    return p


def norm(sd: StateDict, prefix: str) -> Params:
    return {"scale": sd(_j(prefix, "scale"))}


def embed(sd: StateDict, prefix: str) -> Params:
    return {
        "embedding_re": sd(_j(prefix, "embed_real.weight")),
        "embedding_im": sd(_j(prefix, "embed_imag.weight")),
    }


def table(sd: StateDict, key: str) -> np.ndarray:
    """Complex table [..., d, 2] -> planar [..., 2, d]."""
    return np.swapaxes(sd(key), -1, -2)


def _stack_layers(sd: StateDict, prefix: str, n: int, fn) -> dict[str, Params]:
    return {f"layers_{i}": fn(sd, _j(prefix, f"layers.{i}")) for i in range(n)}


def _norms(sd: StateDict, prefix: str, n: int) -> dict[str, Params]:
    return {f"norms_{i}": norm(sd, _j(prefix, f"norms.{i}")) for i in range(n)}


def _output(sd: StateDict, prefix: str) -> Params:
    return {
        "output_proj": linear(sd, _j(prefix, "output_proj")),
        "output_norm": norm(sd, _j(prefix, "output_norm")),
    }


# ------------------------------------------------------------------------- banks


def semantic_bank(sd: StateDict, prefix: str, cfg: cfgs.SemanticBankConfig) -> Params:
    return {
        "concept_table": table(sd, _j(prefix, "concept_memory")),
        **_stack_layers(sd, prefix, cfg.num_layers, linear),
        **_norms(sd, prefix, cfg.num_layers),
        **_output(sd, prefix),
    }


def context_bank(sd: StateDict, prefix: str, cfg: cfgs.ContextBankConfig) -> Params:
    return {
        "window_weights": sd(_j(prefix, "window_weights")),
        "context_proj": linear(sd, _j(prefix, "context_proj")),
        "modulation_proj": linear(sd, _j(prefix, "modulation_proj")),
        **_stack_layers(sd, prefix, cfg.num_layers, linear),
        **_norms(sd, prefix, cfg.num_layers),
        **_output(sd, prefix),
    }


def language_bank(sd: StateDict, prefix: str, cfg: cfgs.LanguageBankConfig) -> Params:
    projs = [linear(sd, _j(prefix, f"language_projs.{i}")) for i in range(cfg.num_languages)]
    stacked = {
        f"language_projs_{k}": np.stack([p[k] for p in projs])
        for k in ("kernel_re", "kernel_im", "bias_re", "bias_im")
    }
    return {
        "language_gates": table(sd, _j(prefix, "language_gates")),
        "universal_proj": linear(sd, _j(prefix, "universal_proj")),
        **stacked,
        **_stack_layers(sd, prefix, cfg.num_layers, linear),
        **_norms(sd, prefix, cfg.num_layers),
        **_output(sd, prefix),
    }


def real_part_of_linear(sd: StateDict, prefix: str) -> Params:
    """Re(Phase2DLinear(x)) as a real map of the concat layout: [W_r; -W_i] and b_r."""
    p = linear(sd, prefix)
    return {"kernel": np.concatenate([p["kernel_re"], -p["kernel_im"]], 0), "bias": p["bias_re"]}


def emotion_bank(sd: StateDict, prefix: str, cfg: cfgs.EmotionBankConfig) -> Params:
    return {
        "emotion_table": table(sd, _j(prefix, "emotion_embeds")),
        "emotion_detector": real_part_of_linear(sd, _j(prefix, "emotion_detector")),
        "proc": linear(sd, _j(prefix, "proc")),
        "norm": norm(sd, _j(prefix, "norm")),
    }


def morphology_bank(sd: StateDict, prefix: str, cfg: cfgs.MorphologyBankConfig) -> Params:
    p = {
        "pattern_table": table(sd, _j(prefix, "pattern_bank")),
        "pattern_detector": linear(sd, _j(prefix, "pattern_detector")),
        **_output(sd, prefix),
    }
    for i in range(cfg.num_layers):
        t = _j(prefix, f"transform_layers.{i}")
        p[f"transform_layers_{i}_norm"] = norm(sd, f"{t}.norm")
        p[f"transform_layers_{i}_rotation"] = {"skew": sd(f"{t}.rotation.skew_params")}
        p[f"transform_layers_{i}_linear"] = linear(sd, f"{t}.linear")
    return p


def orthography_bank(sd: StateDict, prefix: str, cfg: cfgs.OrthographyBankConfig) -> Params:
    p = {
        "shape_table": table(sd, _j(prefix, "shape_patterns")),
        "script_table": table(sd, _j(prefix, "script_embeddings")),
        "shape_detector": linear(sd, _j(prefix, "shape_detector")),
        "script_classifier": linear(sd, _j(prefix, "script_classifier")),
        **_output(sd, prefix),
    }
    for i in range(cfg.num_layers):
        t = _j(prefix, f"layers.{i}")
        p[f"layers_{i}_linear"] = linear(sd, f"{t}.linear")
        p[f"layers_{i}_norm"] = norm(sd, f"{t}.norm")
        p[f"layers_{i}_gate"] = dense(sd, f"{t}.gate")
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


def coupler(sd: StateDict, prefix: str, cfg: cfgs.CouplerConfig, names: tuple[str, ...]) -> Params:
    p: Params = {"fusion": linear(sd, f"{prefix}.fusion"), "norm": norm(sd, f"{prefix}.norm")}
    for n in names:
        p[f"bank_projs_{n}"] = linear(sd, f"{prefix}.bank_projs.{n}")
        p[f"interference_phases_{n}"] = table(sd, f"{prefix}.interference_phases.{n}")
    if len(names) > 1 and cfg.dynamic_routing:
        p["router_0"] = dense(sd, f"{prefix}.router.0")
        p["router_2"] = dense(sd, f"{prefix}.router.2")
    elif len(names) > 1:
        p["static_weights"] = sd(f"{prefix}.static_weights")
    return p


def ssm_layer(sd: StateDict, prefix: str) -> Params:
    return {
        "skew": sd(_j(prefix, "rotation.skew_params")),
        "damping": sd(_j(prefix, "damping_param")),
        "B": linear(sd, _j(prefix, "B")),
        "C": linear(sd, _j(prefix, "C")),
        "D": linear(sd, _j(prefix, "D")),
        "gate_proj": dense(sd, _j(prefix, "gate_proj")),
    }


def backbone(sd: StateDict, prefix: str, cfg: cfgs.BackboneConfig) -> Params:
    n = cfg.num_layers
    return {
        **{f"layers_{i}": ssm_layer(sd, f"{prefix}.layers.{i}") for i in range(n)},
        **_norms(sd, prefix, n),
        "output_norm": norm(sd, f"{prefix}.output_norm"),
        "layer_scales": np.stack([sd(f"{prefix}.layer_scales.{i}") for i in range(n)]),
    }


def memory(sd: StateDict, prefix: str) -> Params:
    return {
        "key_table": table(sd, _j(prefix, "keys")),
        "value_table": table(sd, _j(prefix, "values")),
        "query_proj": linear(sd, _j(prefix, "query_proj")),
        **_output(sd, prefix),
    }


def interleaved_to_concat(weight: np.ndarray) -> np.ndarray:
    """A torch [2d, 2d] weight on the interleaved layout -> a qpf [2d, 2d] concat kernel.

    Concat index j (re_j for j < d, im_{j-d} otherwise) sits at interleaved index perm[j];
    the map in concat coordinates is W[perm][:, perm], transposed to a [in, out] kernel.
    """
    d = weight.shape[0] // 2
    perm = np.concatenate([2 * np.arange(d), 2 * np.arange(d) + 1])
    return weight[np.ix_(perm, perm)].T


def episodic(sd: StateDict, prefix: str) -> Params:
    return {
        f"{n}_proj": {"kernel": interleaved_to_concat(sd(f"{prefix}.{n}_proj.weight"))}
        for n in ("query", "key", "value")
    }


def morph_embed(sd: StateDict, prefix: str) -> Params:
    return {
        "root_embed": embed(sd, _j(prefix, "root_embed")),
        "prefix_rotations": sd(_j(prefix, "prefix_rotations.rotation_params")),
        "suffix_rotations": sd(_j(prefix, "suffix_rotations.rotation_params")),
        "prefix_magnitude": sd(_j(prefix, "prefix_magnitude.weight")),
        "suffix_magnitude": sd(_j(prefix, "suffix_magnitude.weight")),
    }


def byte_patcher(sd: StateDict, prefix: str, patch_size: int) -> Params:
    return {
        "embed": embed(sd, _j(prefix, "byte_embed")),
        "position_weights": sd(_j(prefix, "position_weights")),
        **{
            f"position_proj_{i}": linear(sd, _j(prefix, f"position_proj.{i}"))
            for i in range(patch_size)
        },
        **_output(sd, prefix),
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


def model_params(sd: StateDict, config: cfgs.ModelConfig) -> Params:
    """All qpf parameters of ``config`` from the original's state_dict (torch names)."""
    p: Params = {}
    if config.input_mode == "morphological":
        p["embed"] = morph_embed(sd, "embed.morph_embed")
        p["prefix_head"] = dense(sd, "prefix_proj")
        p["suffix_head"] = dense(sd, "suffix_proj")
    else:
        p["embed"] = embed(sd, "embed.bpe_embed")
    for b in config.banks:
        p[f"banks_{b.type}"] = BANK_CONVERTERS[b.type](sd, f"banks.{b.type}", b)
    if config.banks:
        p["coupler"] = coupler(sd, "coupler", config.coupler, config.bank_names)
    p["backbone"] = backbone(sd, "backbone", config.backbone)
    if config.memory is not None:
        p["memory"] = memory(sd, "memory")
        p["memory_scale"] = sd("memory_scale")
    if config.episodic is not None:
        p["episodic"] = episodic(sd, "episodic")
    p["head_proj"] = linear(sd, "lm_head.0")
    p["head_norm"] = norm(sd, "lm_head.1")
    p["output_proj"] = dense(sd, "output_proj")
    sd.check_all_used()
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
