"""The model contract every family follows: call signature, output, dtypes, decoding state.

A family's Flax module is called as::

    out = module.apply({"params": p}, inputs, state=None, deterministic=True,
                       rngs={"dropout": key}, segment_ids=None)

inputs: int ``[B, T]`` token ids (``[B, T, 3]`` for qpf's morphological mode).
state: None for an ordinary forward from position 0, or a decoding state (below).
Returns a ``ModelOutput``; ``out.logits[:, t]`` scores token t+1.
segment_ids: only for families that declare ``ModelFamily.segment_resets`` (the keyword is
absent otherwise): int ``[B, T]``, the document index of each position in a packed window
(``qpf.data`` emits them with ``DataConfig.segment_ids``; only changes matter: an id that
comes back after another opens a new document). Where the id changes from t-1 to t, every
recurrence carries a zero state into t, convolutions take no tap from before t and
attention sees no key before t, so each document gets the logits it would get alone (from
position 0). None (the default) is one document: bit-identical to a call without it. Only
for full forwards (``state=None``); decoding does not take segment ids.

Decoding state: a pytree of arrays with at least ``"pos"`` (int32 scalar: tokens consumed).
``family.init_state(config, batch, max_len)`` gives the zero state; feeding a sequence in
pieces, each call getting the previous call's ``out.state``, gives the same logits as one
pass (a family may require pieces to start at multiples of
``ModelFamily.piece_alignment(config)``). ``max_len`` bounds what a cache must hold.

Dtypes: configs (all inheriting ``qpf.config.NumericsConfig``, which validates these fields)
name a compute ``dtype`` and a ``param_dtype`` from ``DTYPES``; parameters
stay ``param_dtype`` (float32 by default), GEMMs run in ``dtype``, and scans, norms and
softmaxes accumulate in float32 whatever the compute dtype. A config's
``matmul_precision`` (``qpf.config.MATMUL_PRECISIONS``) sets the precision of float32
matrix products inside the model (GPUs default to TF32 for them): decorate the module's
``__call__`` with ``applies_matmul_precision``. Attention caches are built by
``kv_cache_state`` (length from ``cache_length``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
State = dict[str, Any]

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@flax.struct.dataclass
class ModelOutput:
    """What a forward pass returns.

    logits: ``[B, T, V]``, logits[t] scores token t+1 (every input mode); None when the
      call asked for ``return_features`` and the model has a linear head.
    phase_states: the LM-head input ``[B, T', 2, d]`` of phase models (T' = complete
      patches in byte mode); None for models without phase states (baselines), so the
      phase objectives contribute nothing.
    coupling_loss: the bank coupling loss (0 for models without banks).
    state: the decoding state after this input.
    prefix_logits / suffix_logits: affix heads ``[B, T, V_affix]`` (morphological mode).
    intermediates: per-stage tensors when requested (parity checks, analysis).
    features / head_weight: with ``return_features``, the LM head's input ``[B, T, F]`` and
      its weight ``[F, V]`` (logits = ``qpf.ops.losses.head_logits(features, head_weight)``);
      None otherwise. The fused output layer + loss uses them so that training and
      evaluation never build the full ``[B, T, V]`` logits; a family whose head is not one
      linear map simply does not accept ``return_features`` and the loss falls back.
    """

    logits: Array
    phase_states: Array | None
    coupling_loss: Array
    state: State
    prefix_logits: Array | None = None
    suffix_logits: Array | None = None
    intermediates: dict[str, Array] | None = None
    features: Array | None = None
    head_weight: Array | None = None


def cache_length(config: Any, max_len: int | None) -> int:
    """Slots S of a decoding cache: ``max_len``, or ``config.max_len`` when None.

    Raises ``ValueError`` (a ``ConfigError``'s base) unless S >= 1.
    """
    length = config.max_len if max_len is None else max_len
    if length < 1:
        raise ValueError(f"init_state: max_len must be >= 1, got {length}")
    return length


def kv_cache_state(
    config: Any,
    batch_size: int,
    max_len: int | None,
    key_shape: tuple[int, ...],
    value_shape: tuple[int, ...] | None = None,
    dtype: Any = None,
    value_dtype: Any = None,
) -> State:
    """An empty KV cache at position 0 for ``config.num_layers`` layers.

    Returns ``{"pos": 0, "k": [L, B, S, *key_shape], "v": [L, B, S, *value_shape]}`` of
    zeros, S = ``cache_length(config, max_len)``. ``value_shape`` defaults to
    ``key_shape``; ``dtype`` (keys) to the compute dtype ``DTYPES[config.dtype]`` and
    ``value_dtype`` to ``dtype``.
    """
    dtype = DTYPES[config.dtype] if dtype is None else dtype
    value_dtype = dtype if value_dtype is None else value_dtype
    lead = (config.num_layers, batch_size, cache_length(config, max_len))
    value_shape = key_shape if value_shape is None else value_shape
    return {
        "pos": jnp.zeros((), jnp.int32),
        "k": jnp.zeros((*lead, *key_shape), dtype),
        "v": jnp.zeros((*lead, *value_shape), value_dtype),
    }


def matmul_precision(config: Any) -> contextlib.AbstractContextManager:
    """The context that applies ``config.matmul_precision`` (none for 'default' or absent)."""
    name = getattr(config, "matmul_precision", "default")
    return contextlib.nullcontext() if name == "default" else jax.default_matmul_precision(name)


def applies_matmul_precision(call: Callable) -> Callable:
    """Decorate a module's ``__call__`` so its traced matrix products use the precision of
    ``self.config`` (the setting is read at trace time, so it holds under jit)."""

    @functools.wraps(call)
    def wrapped(self, *args, **kwargs):
        with matmul_precision(self.config):
            return call(self, *args, **kwargs)

    return wrapped
