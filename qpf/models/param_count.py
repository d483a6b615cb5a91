"""Parameter counts per component, computed from shapes only (no weights allocated)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf import config as cfgs

# Top-level parameter collections -> the component they belong to.
_COMPONENT = {
    "embed": "embedding",
    "patcher": "byte_encoder",
    "byte_decoder": "byte_decoder",
    "start_context": "byte_decoder",
    "coupler": "coupler",
    "backbone": "backbone",
    "memory": "memory",
    "memory_scale": "memory",
    "episodic": "episodic",
    "head_proj": "lm_head",
    "head_norm": "lm_head",
    "output_proj": "lm_head",
    "prefix_head": "lm_head",
    "suffix_head": "lm_head",
}


def param_shapes(config: cfgs.ModelConfig) -> Any:
    """The params pytree of a model as ShapeDtypeStructs (``jax.eval_shape`` of init)."""
    from qpf.models.phase_field import QPFModel  # imported here: qpf.models imports this module

    tokens = (1, 8, 3) if config.input_mode == "morphological" else (1, 8)
    init = lambda key: QPFModel(config).init(key, jnp.zeros(tokens, jnp.int32))  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0))["params"]


def count_by_component(params: Any) -> dict[str, int]:
    """{component: parameter count} plus 'total', for a params pytree (arrays or shapes)."""
    counts: Counter[str] = Counter()
    for name, subtree in params.items():
        component = _COMPONENT.get(name) or (
            f"bank:{name.removeprefix('banks_')}" if name.startswith("banks_") else name
        )
        counts[component] += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(subtree))
    counts["total"] = sum(counts.values())
    return dict(counts)


def parameter_report(config: cfgs.ModelConfig) -> dict[str, int]:
    """Per-component parameter counts of ``config`` without allocating weights."""
    return count_by_component(param_shapes(config))


def family_param_count(family: Any, config: Any) -> int:
    """Total parameters of any ``ModelFamily`` model (token input ``[1, 8]``), shapes only."""
    init = lambda key: family.build(config).init(key, jnp.zeros((1, 8), jnp.int32))  # noqa: E731
    params = jax.eval_shape(init, jax.random.key(0))["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
