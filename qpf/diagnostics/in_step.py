"""The philosophy metrics and per-module norms as the train step computes them.

Everything here runs inside the jitted step on device; the values join the step's other
scalars and reach the host only at the logging interval. ``mode``: 'off', 'on' (the
definitions of ``qpf.diagnostics.philosophy``) or 'faithful' (the original's).

Buddhi needs logits; over a 50257-way vocabulary a softmax per position costs as much as
the loss, so it is computed on at most ``BUDDHI_POSITIONS`` evenly spaced positions per row
(with a fused-head forward, the head is applied to those positions only).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf.diagnostics import model_stats
from qpf.diagnostics.philosophy import bank_summary, philosophy_metrics
from qpf.layers.matrix_state import memories_as_planes
from qpf.ops.losses import head_logits

Array = jax.Array

INSIGHT_MODES = ("off", "on", "faithful")
# Measured on the 2-core CPU, qpf:tiny-v5 at 16 x 128 GPT-2 tokens: the step takes 933 ms
# without metrics, 1,154 ms with Buddhi on 32 positions per row; 8 keep the cost near 5%.
BUDDHI_POSITIONS = 8


def wants_intermediates(module: nn.Module) -> dict[str, bool]:
    """Apply kwargs that make ``module`` return its intermediates, if it can."""
    params = inspect.signature(type(module).__call__).parameters
    return {"return_intermediates": True} if "return_intermediates" in params else {}


def _bank_names(module: nn.Module) -> tuple[str, ...]:
    config = getattr(module, "config", None)
    return tuple(getattr(config, "bank_names", ()) or ())


def init_carry(module: nn.Module, mode: str) -> dict[str, Array] | None:
    """The train state's Viveka carry: previous bank summary ``[n, 2, d]`` and a seen flag."""
    names = _bank_names(module)
    if mode == "off" or not names:
        return None
    dim = module.config.dim
    return {
        "bank_summary": jnp.zeros((len(names), 2, dim), jnp.float32),
        "seen": jnp.zeros((), jnp.bool_),
    }


def step_metrics(
    module: nn.Module, out: Any, mask: Array, carry: dict[str, Array] | None, mode: str
) -> tuple[dict[str, Array], Array | None]:
    """Philosophy metrics of one forward pass (no gradient flows through them).

    out: the ``ModelOutput`` (with ``intermediates`` when the model provides them);
    mask ``[B, T]`` real tokens; carry from ``init_carry``. Returns (metrics, this step's
    bank summary or None).
    """
    out = jax.lax.stop_gradient(out)
    inter = out.intermediates or {}
    t = mask.shape[1]
    stride = max(1, -(-t // BUDDHI_POSITIONS))
    if out.logits is not None:
        logits = out.logits[:, ::stride]
    else:  # a fused-head forward: the head on the sampled positions only
        logits = head_logits(out.features[:, ::stride], out.head_weight)
    banks = {n: inter[f"bank/{n}"] for n in _bank_names(module) if f"bank/{n}" in inter}
    prev = None
    if carry is not None and banks:
        prev = jnp.where(
            carry["seen"],
            carry["bank_summary"],
            bank_summary([banks[n] for n in sorted(banks)], _mask_for(banks, mask)),
        )
    state = out.state if isinstance(out.state, dict) else {}
    read = None
    if "memory_topk_weights" in inter:
        read = (inter["memory_topk_weights"], inter["memory_topk_indices"])
    metrics = philosophy_metrics(
        logits=logits,
        mask=mask[:, ::stride],
        ssm_state=_ssm_planes(state.get("backbone")),
        banks=banks or None,
        prev_bank_summary=prev,
        memory_read=read,
        num_slots=_num_slots(module),
        faithful=mode == "faithful",
    )
    summary = None
    if banks:
        summary = bank_summary([banks[n] for n in sorted(banks)], _mask_for(banks, mask))
    return metrics, summary


def _ssm_planes(state: Any) -> Array | None:
    """The backbone state as ``[L, B, 2, N]``: the SSM's as is (its ``h`` when the causal
    convolution makes it a dict); a matrix-state backbone's as its memories flattened per
    layer (None when it has no matrix layer)."""
    if isinstance(state, dict):
        return state["h"] if "h" in state else memories_as_planes(state)
    return state


def _mask_for(banks: dict[str, Array], mask: Array) -> Array | None:
    first = next(iter(banks.values()))
    return mask if first.shape[1] == mask.shape[1] else None


def _num_slots(module: nn.Module) -> int:
    memory = getattr(getattr(module, "config", None), "memory", None)
    return int(getattr(memory, "num_slots", 0) or 0)


def norm_metrics(grads: Any, old_params: Any, new_params: Any) -> dict[str, Array]:
    """``grad_norm/<module>`` and ``update_ratio/<module>`` for each top-level module."""
    out = {f"grad_norm/{k}": v for k, v in model_stats.module_norms(grads).items()}
    ratios = model_stats.update_ratios(old_params, new_params)
    out.update({f"update_ratio/{k}": v for k, v in ratios.items()})
    return out
