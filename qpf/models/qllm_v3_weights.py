"""Load the original v3 PyTorch state dict (``BrainInspiredLLM.state_dict()`` as numpy
arrays, e.g. the fixtures' ``param/<key>`` entries) into a faithful ``QLLMv3`` model's
variables ``{'params': ..., 'state': ...}``.

Layouts: ``nn.Linear.weight [out, in]`` -> ``kernel [in, out]``; LayerNorm ``weight`` ->
``scale``; per-layer ModuleList entries ``name.i`` -> ``name_i``. The persistent tensors
that the original keeps as ``nn.Parameter``s but only writes through ``.data`` go to the
'state' collection, stacked over layers where there is one per layer; the written-table
deltas start at zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf.models.qllm_v3 import QLLMv3, QLLMv3Config

# torch key suffix -> (state key, per-layer?) for the persistent tensors.
_STATE = {
    "membrane_potential": ("membrane_potential", True),
    "spike_history": ("spike_history", True),
    "usage_count": ("usage_count", True),
    "importance_scores": ("importance_scores", True),
    "episodic_weights": ("episodic_weights", False),
}
_NORMS = ("consciousness_norm", "memory_norm")


def config_from_kwargs(kwargs: Mapping[str, Any], **overrides: Any) -> QLLMv3Config:
    """A faithful config from ``BrainInspiredLLM(**kwargs)`` constructor arguments."""
    keys = ("vocab_size", "dim", "num_layers", "memory_size", "concept_dim", "num_concepts")
    return QLLMv3Config(mode="faithful", **{k: kwargs[k] for k in keys if k in kwargs}, **overrides)


def _param_path(key: str) -> list[str]:
    """'developmental_plasticity.0.expansion_layers.1.weight' -> flax path."""
    parts: list[str] = []
    for piece in key.split("."):
        if piece.isdigit():
            parts[-1] = f"{parts[-1]}_{piece}"
        else:
            parts.append(piece)
    leaf = parts[-1]
    if parts == ["token_embedding", "weight"]:
        return ["token_embedding"]
    if leaf == "weight":
        parts[-1] = "scale" if parts[-2] in _NORMS else "kernel"
    return parts


def _set(tree: dict, path: list[str], value: np.ndarray) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise KeyError(f"duplicate parameter {'/'.join(path)}")
    tree[path[-1]] = value


def load_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], config: QLLMv3Config, dtype: Any = np.float32
) -> dict[str, Any]:
    """Strict load: every model variable must be filled and every torch key used.

    Returns ``{'params', 'state'}`` as numpy arrays of ``dtype``; raises KeyError naming
    missing or unexpected keys and ValueError on a shape mismatch.
    """
    if config.mode != "faithful":
        raise ValueError("the original's state dict loads into mode='faithful' only")
    params: dict[str, Any] = {}
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    state: dict[str, Any] = {}
    for key, value in state_dict.items():
        value = np.asarray(value, dtype)
        suffix = key.rsplit(".", 1)[-1]
        if suffix in _STATE:
            name, layered = _STATE[suffix]
            if layered:
                per_layer.setdefault(name, {})[int(key.split(".")[1])] = value
            else:
                state[name] = value
            continue
        path = _param_path(key)
        if path[-1] == "kernel":
            value = value.T
        _set(params, path, value)
    for name, rows in per_layer.items():
        state[name] = np.stack([rows[i] for i in range(len(rows))])
    state["memory_slots_delta"] = np.zeros_like(params["short_term_memory"]["memory_slots"])
    state["episodic_memory_delta"] = np.zeros_like(params["long_term_memory"]["episodic_memory"])
    _check_against_model({"params": params, "state": state}, config)
    return {"params": params, "state": state}


def _check_against_model(variables: dict[str, Any], config: QLLMv3Config) -> None:
    init = lambda k: QLLMv3(config).init(k, jnp.zeros((1, 4), jnp.int32))  # noqa: E731
    want = jax.eval_shape(init, jax.random.key(0))
    want = {k: want[k] for k in ("params", "state")}
    flat_want = {
        jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(want)
    }
    flat_got = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path(variables)
    }
    missing = sorted(set(flat_want) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_want))
    if missing or extra:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {extra}")
    bad = [k for k in flat_want if tuple(flat_want[k]) != tuple(flat_got[k])]
    if bad:
        raise ValueError(
            "shape mismatch: " + ", ".join(f"{k}: {flat_got[k]} vs {flat_want[k]}" for k in bad)
        )
