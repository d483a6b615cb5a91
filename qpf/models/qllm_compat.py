"""Bridges to the original QLLM code (qllm2 @ e03627d): its weights, sampler and generation.

* ``config_from_kwargs`` / ``params_from_torch``: upstream's constructor kwargs and
  ``state_dict`` (numpy arrays, Linear weights ``[out, in]``) -> ``QLLMConfig`` and Flax
  params. Every upstream key must be used and every shape must match.
* ``upstream_filter``: upstream's ``sample_next_token`` up to the multinomial, bugs
  included (§3.10): the repetition penalty divides every logit of a recent id once per
  occurrence (negative logits move toward 0, i.e. are boosted), top-p drops the token that
  crosses p, and min-p is an absolute probability threshold that can remove every token
  (the probabilities are then NaN). For parity and for explaining upstream samples only.
* ``fixed_sampling``: the same knobs mapped onto qpf's shared sampler
  (``qpf.ops.sampling``), which fixes those bugs: a sign-aware penalty applied once per
  present token, the standard top-p and a min-p relative to the most likely token.
* ``generate_windowed``: upstream's generation loop: the context is the *first*
  ``max_len`` prompt bytes (a space if empty) and each step re-runs the full forward on the
  last ``max_len`` ids (no cache). qpf's own generation (``qpf.generation``) decodes
  exactly with the KV cache instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf.models.qllm import QLLM, QLLMConfig
from qpf.ops.sampling import SamplingConfig

Array = jax.Array

RECENT_WINDOW = 64  # upstream's repetition-penalty window (last 64 ids)
_KWARGS = {
    "vocab_size": "vocab_size",
    "dim": "dim",
    "depth": "num_layers",
    "num_heads": "num_heads",
    "seq_length": "max_len",
    "global_tokens": "global_tokens",
    "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha",
    "lora_train_only": "lora_train_only",
    "dropout": "dropout",
}


def config_from_kwargs(kwargs: Mapping[str, Any], **overrides: Any) -> QLLMConfig:
    """``QuantumInspiredLLM(**kwargs)``'s configuration as a ``QLLMConfig``."""
    unknown = set(kwargs) - set(_KWARGS)
    if unknown:
        raise ValueError(f"unknown QuantumInspiredLLM kwargs: {sorted(unknown)}")
    fields = {_KWARGS[k]: v for k, v in kwargs.items()}
    if "lora_alpha" in fields:
        fields["lora_alpha"] = float(fields["lora_alpha"])
    return QLLMConfig(**{**fields, **overrides})


def _linear(remaining: dict[str, np.ndarray], key: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": remaining.pop(f"{key}.weight").T}
    if bias:
        out["bias"] = remaining.pop(f"{key}.bias")
    return out


def _norm(remaining: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    return {"scale": remaining.pop(f"{key}.weight"), "bias": remaining.pop(f"{key}.bias")}


def params_from_torch(
    state_dict: Mapping[str, np.ndarray], config: QLLMConfig, dtype: Any = np.float32
) -> dict[str, Any]:
    """Upstream ``state_dict`` -> Flax params of ``QLLM(config)`` (cast to ``dtype``).

    Raises ValueError on unused upstream keys or on shapes that differ from the model's.
    """
    remaining = {k: np.asarray(v) for k, v in state_dict.items()}
    p: dict[str, Any] = {
        "tok_embed": {"embedding": remaining.pop("tok_embed.weight")},
        "pos_embedding": remaining.pop("pos_embed.weight"),
        "final_norm": _norm(remaining, "ln"),
        "head": _linear(remaining, "head", bias=False),
    }
    if config.rotator != "none":
        p["phase_theta"] = remaining.pop("phase.phase")
    if config.global_tokens:
        p["global_memory_table"] = remaining.pop("global_memory")
    for i in range(config.num_layers):
        pre = f"blocks.{i}"
        block: dict[str, Any] = {
            "attn_norm": _norm(remaining, f"{pre}.ln1"),
            "mlp_norm": _norm(remaining, f"{pre}.ln2"),
            "fc1": _linear(remaining, f"{pre}.mlp.0"),
            "fc2": _linear(remaining, f"{pre}.mlp.2"),
        }
        for n in ("q", "k", "v", "o"):
            lin: dict[str, Any] = {"base": _linear(remaining, f"{pre}.attn.{n}.linear")}
            if config.lora_rank:
                lin["lora_down_kernel"] = remaining.pop(f"{pre}.attn.{n}.B").T
                lin["lora_up_kernel"] = remaining.pop(f"{pre}.attn.{n}.A").T
            block[f"w{n}"] = lin
        p[f"blocks_{i}"] = block
    if remaining:
        raise ValueError(f"upstream keys not used by this config: {sorted(remaining)}")
    expected = jax.eval_shape(
        lambda: QLLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    got = jax.tree.map(lambda a: a.shape, p)
    want = jax.tree.map(lambda a: a.shape, expected)
    if got != want:
        raise ValueError(f"parameter shapes differ from the model's:\n{got}\nvs\n{want}")
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), p)


# --------------------------------------------------------------------------- sampling


def recent_counts(recent_ids: Array, vocab_size: int) -> Array:
    """Occurrences of each id in the recent window: int ``[B, R]`` -> float ``[B, V]``."""
    rows = jnp.broadcast_to(jnp.arange(recent_ids.shape[0])[:, None], recent_ids.shape)
    return jnp.zeros((recent_ids.shape[0], vocab_size)).at[rows, recent_ids].add(1.0)


def upstream_penalty(logits: Array, recent_ids: Array, penalty: float) -> Array:
    """Upstream's in-place ``logits[b, id] /= penalty`` for every id of the window, once per
    occurrence and whatever the sign. logits ``[B, V]``, recent_ids int ``[B, R]``."""
    if penalty == 1.0:
        return logits
    counts = recent_counts(recent_ids, logits.shape[-1]).astype(logits.dtype)
    return logits / jnp.asarray(penalty, logits.dtype) ** counts


def upstream_filter(
    logits: Array,
    recent_ids: Array,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    min_p: float,
) -> tuple[Array, Array]:
    """Upstream ``sample_next_token`` before its draw: (penalised logits, probs), ``[B, V]``.

    probs is what upstream hands to ``torch.multinomial`` (NaN rows where min-p removed
    every token); with temperature <= 0 upstream returns the argmax of the penalised
    logits instead, and probs is the one-hot of that argmax.
    """
    penalised = upstream_penalty(logits, recent_ids, repetition_penalty)
    if temperature <= 0:
        return penalised, jax.nn.one_hot(
            jnp.argmax(penalised, -1), logits.shape[-1], dtype=logits.dtype
        )
    x = penalised / max(1e-8, temperature)
    neg = jnp.asarray(-jnp.inf, x.dtype)
    if top_k > 0:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][:, -1:]
        x = jnp.where(x < kth, neg, x)
    if 0.0 < top_p < 1.0:
        order = jnp.argsort(-x, axis=-1, stable=True)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cums = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        drop = (cums > top_p).at[:, 0].set(False)  # the crossing token is dropped too
        rows = jnp.arange(x.shape[0])[:, None]
        x = jnp.zeros_like(x).at[rows, order].set(jnp.where(drop, neg, sorted_x))
    if min_p > 0.0:
        x = jnp.where(jax.nn.softmax(x, axis=-1) < min_p, neg, x)  # absolute threshold
    return penalised, _softmax_nan(x)


def _softmax_nan(x: Array) -> Array:
    """softmax as torch computes it: an all −inf row gives NaN (jax's also does; explicit)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def fixed_sampling(
    temperature: float, top_k: int, top_p: float, repetition_penalty: float, min_p: float
) -> SamplingConfig:
    """Upstream's sampling knobs as qpf's shared (bug-fixed) ``SamplingConfig``.

    top_p outside (0, 1) is off upstream, so it maps to 1; temperature <= 0 is greedy; min_p
    becomes relative to the most likely token (standard min-p), so it never empties the
    distribution.
    """
    return SamplingConfig(
        temperature=max(0.0, float(temperature)),
        top_k=int(top_k),
        top_p=float(top_p) if 0.0 < top_p < 1.0 else 1.0,
        min_p=float(min_p),
        repetition_penalty=float(repetition_penalty),
    )


# ------------------------------------------------------------------------ generation

Picker = Callable[[Array, Array, Array], Array]
"""(logits ``[1, V]``, recent ids ``[1, 64]``, step) -> next id ``[1]``; jitted, so
jnp-traceable. Recent ids >= V are padding (scatters drop them)."""


def generate_windowed(
    module: QLLM, params: Any, prompt_ids: list[int], max_new: int, pick: Picker
) -> tuple[list[int], np.ndarray]:
    """Upstream's generation loop for one prompt (see the module docstring).

    Returns (the context followed by the generated ids, the last-position logits of every
    step ``[max_new, V]``, before any penalty).
    """
    window, vocab = module.config.max_len, module.config.vocab_size

    @jax.jit
    def step_fn(p: Any, x: Array, recent: Array, step: Array) -> tuple[Array, Array]:
        logits = module.apply({"params": p}, x).logits[:, -1]
        return logits, pick(logits, recent, step)

    ids = list(prompt_ids[:window]) or [ord(" ")]
    steps = []
    for step in range(max_new):
        recent = ids[-RECENT_WINDOW:]
        recent = [vocab] * (RECENT_WINDOW - len(recent)) + recent
        logits, nxt = step_fn(
            params,
            jnp.asarray([ids[-window:]], jnp.int32),
            jnp.asarray([recent], jnp.int32),
            jnp.asarray(step, jnp.int32),
        )
        steps.append(np.asarray(logits[0]))
        ids.append(int(nxt[0]))
    return ids, np.stack(steps)
