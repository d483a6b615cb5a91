"""Load the original v2 PyTorch state dict (``HardwareOptimizedQuantumLLM``) into
``qllm_v2`` params, and rebuild its config from the constructor arguments.

Layouts (spec §C1, fixtures README): ``nn.Linear.weight [out, in]`` -> kernel ``[in, out]``;
``head_weights*`` are already ``[in, out]``; MHA ``in_proj_weight [3C, C]`` splits into
q/k/v; ``global_phase [1, 1, D]`` -> ``[D]``; ``language_gates`` keeps row 0 and
``phase_init`` its first P entries (the only ones read). Keys the forward never reads are
listed in ``UNUSED_KEYS`` and skipped; any other unknown key is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from qpf.models.qllm_v2 import QLLMv2Config

UNUSED_KEYS = (
    "entanglement_strength",
    "measurement_threshold",
    "advanced_phase_coherence.scales",
    "advanced_phase_coherence.context_window",
    "advanced_phase_coherence.semantic_clusters",
    "advanced_phase_coherence.cluster_assignments",
)

_LINEAR_PREFIXES = {
    "concept_projection": ("concept_projection",),
    "phase_projection": ("phase_projection",),
    "output_proj": ("output_proj",),
    "global_interference.output_proj": ("global_interference", "output_proj"),
}
_APC_LINEARS = ("scale_projection", "semantic_projection", "context_projection", "coherence_fusion")


def config_from_torch(kwargs: Mapping[str, Any], **overrides: Any) -> QLLMv2Config:
    """``HardwareOptimizedQuantumLLM(**kwargs)`` -> the faithful config (plus overrides)."""
    cfg = {
        "vocab_size": int(kwargs.get("vocab_size", 256)),
        "dim": int(kwargs.get("dim", 512)),
        "num_layers": int(kwargs.get("num_layers", 8)),
        "num_heads": int(kwargs.get("num_heads", 8)),
        "phase_dim": int(kwargs.get("phase_dim", 64)),
        "max_seq_len": int(kwargs.get("max_seq_len", 512)),
        "concept_dim": int(kwargs.get("concept_dim", 256)),
        "use_checkpoint": bool(kwargs.get("use_checkpoint", False)),
        "mode": "faithful",
    }
    cfg.update(overrides)
    return QLLMv2Config(**cfg)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise ValueError(f"duplicate parameter {'/'.join(path)}")
    tree[path[-1]] = value


def _linear(tree: dict, path: tuple[str, ...], kind: str, value: np.ndarray) -> None:
    if kind == "weight":
        _set(tree, (*path, "kernel"), value.T)
    else:
        _set(tree, (*path, "bias"), value)


def _norm(tree: dict, path: tuple[str, ...], kind: str, value: np.ndarray) -> None:
    _set(tree, (*path, "scale" if kind == "weight" else "bias"), value)


def _concept(tree: dict, rest: str, v: np.ndarray, cfg: QLLMv2Config) -> bool:
    root = ("concept_layer",)
    if rest in ("word_concept_map.weight", "concept_embeddings"):
        _set(tree, (*root, rest.split(".")[0]), v)
    elif rest == "language_gates":
        _set(tree, (*root, "language_gates"), v[:1])
    elif m := re.fullmatch(r"(norm[12])\.(weight|bias)", rest):
        _norm(tree, (*root, m[1]), m[2], v)
    elif m := re.fullmatch(r"(semantic_coherence|concept_to_token)\.(weight|bias)", rest):
        _linear(tree, (*root, m[1]), m[2], v)
    elif m := re.fullmatch(r"concept_projections\.(\d+)\.(weight|bias)", rest):
        _linear(tree, (*root, f"concept_projections_{m[1]}"), m[2], v)
    elif m := re.fullmatch(r"concept_attention\.in_proj_(weight|bias)", rest):
        c = cfg.concept_dim
        for i, name in enumerate("qkv"):
            part = v[i * c : (i + 1) * c]
            key = f"{name}_kernel" if m[1] == "weight" else f"{name}_bias"
            _set(tree, (*root, "concept_attention", key), part.T if m[1] == "weight" else part)
    elif m := re.fullmatch(r"concept_attention\.out_proj\.(weight|bias)", rest):
        key = "out_kernel" if m[1] == "weight" else "out_bias"
        _set(tree, (*root, "concept_attention", key), v.T if m[1] == "weight" else v)
    else:
        return False
    return True


def _apc(tree: dict, rest: str, v: np.ndarray) -> bool:
    root = ("advanced_phase_coherence",)
    if rest == "token_similarity":
        _set(tree, (*root, rest), v)
    elif m := re.fullmatch(r"(norm[123])\.(weight|bias)", rest):
        _norm(tree, (*root, m[1]), m[2], v)
    elif m := re.fullmatch(r"coherence_enhancement\.(\d+)\.(weight|bias)", rest):
        _linear(tree, (*root, f"coherence_enhancement_{m[1]}"), m[2], v)
    elif m := re.fullmatch(r"(\w+)\.(weight|bias)", rest):
        if m[1] not in _APC_LINEARS:
            return False
        _linear(tree, (*root, m[1]), m[2], v)
    else:
        return False
    return True


def _one(tree: dict, key: str, v: np.ndarray, cfg: QLLMv2Config) -> bool:
    head, _, rest = key.partition(".")
    if key in ("token_embedding.weight", "pos_embedding.weight", "semantic_phase_map.weight"):
        _set(tree, (head, "embedding"), v)
    elif key in ("frequency_phase_adjust", "position_phase_mod"):
        _set(tree, (key,), v)
    elif key == "phase_init":
        _set(tree, (key,), v[: cfg.phase_dim])
    elif key == "quantum_uncertainty":
        if cfg.evolve:
            _set(tree, (key,), v)
    elif head == "concept_layer":
        return _concept(tree, rest, v, cfg)
    elif head == "advanced_phase_coherence":
        return _apc(tree, rest, v)
    elif m := re.fullmatch(
        r"quantum_layers\.(\d+)\.(base_op|expand_ops\.\d+|contract_ops\.\d+)"
        r"\.(weight|bias)",
        key,
    ):
        name = m[2].replace(".", "_")
        suffix = "kernel" if m[3] == "weight" else "bias"
        _set(tree, (f"quantum_layers_{m[1]}", f"{name}_{suffix}"), v.T if m[3] == "weight" else v)
    elif head == "global_interference" and rest == "global_phase":
        _set(tree, (head, rest), v.reshape(-1))
    elif head == "global_interference" and rest.startswith("head_"):
        _set(tree, (head, rest), v)
    elif head == "global_interference" and rest.startswith("norm."):
        _norm(tree, (head, "norm"), rest.split(".")[1], v)
    else:
        prefix, _, kind = key.rpartition(".")
        if prefix not in _LINEAR_PREFIXES or kind not in ("weight", "bias"):
            return False
        _linear(tree, _LINEAR_PREFIXES[prefix], kind, v)
    return True


def params_from_torch(
    state_dict: Mapping[str, np.ndarray], config: QLLMv2Config, dtype: Any = np.float32
) -> dict[str, Any]:
    """A torch state dict (numpy arrays) -> ``{'params': ...}`` for ``QLLMv2(config)``."""
    tree: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in UNUSED_KEYS:
            continue
        if not _one(tree, key, np.asarray(value, dtype), config):
            unknown.append(key)
    if unknown:
        raise KeyError(f"unmapped v2 state-dict keys: {unknown}")
    return {"params": tree}
