"""Exact incremental decoding over the model-family contract: state, prefill and one step.

Every family's module is called as ``module.apply(params, inputs [B, T], state)`` and
returns ``.logits [B, T, V]`` and ``.state``; its zero state comes from the family's
``init_state(config, batch, max_len)``. A ``DecodeState`` wraps that state.

byte_patch mode is the one exception that needs care: the model only accepts a call that
starts at a patch boundary, and a chunk whose length is not a multiple of the patch size P
only as the *last* call. So the decoding state keeps the model state at the last patch
boundary plus the pending bytes of the current patch. A step with j < P pending bytes calls
the model on those j bytes from the boundary state — no patch completes, so only the cheap
within-patch decoder runs and the core state is not touched; the P-th byte completes the
patch, runs the core once and moves the boundary. Total work stays O(n).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qpf.config import ConfigError
from qpf.models.family import apply_for_features
from qpf.ops.losses import head_logits
from qpf.zoo import family_names, family_of

Array = jax.Array
State = dict[str, Any]
Params = Any  # the variables passed to ``module.apply``: ``{'params': ...}``

BYTE_PAD = 256  # qpf.layers.embeddings.BYTE_PAD, fills the unused slots of ``pending``
DEFAULT_MAX_NEW = 1024  # cache headroom past the prompt when max_len is not given


@flax.struct.dataclass
class DecodeState:
    """Decoding state of ``B`` rows.

    model: the family's state; in byte_patch mode the state at the last patch boundary.
    pending: int32 ``[B, P]`` bytes of the current incomplete patch (``[B, 0]`` outside
      byte_patch mode); slots >= num_pending hold BYTE_PAD.
    num_pending: int32 scalar, bytes in ``pending`` (0 outside byte_patch mode).
    """

    model: State
    pending: Array
    num_pending: Array


# -------------------------------------------------------------------- family lookup


def family_init_state(module: nn.Module) -> Callable[[Any, int, int], State]:
    """The ``init_state`` of the module's family, found by its config's ``family_name``."""
    config = getattr(module, "config", None)
    if config is None:
        raise ConfigError(
            f"{type(module).__name__} has no `config`; generation needs a model built by a "
            f"registered family ({', '.join(family_names())})"
        )
    return family_of(config).init_state


def input_mode(module: nn.Module) -> str:
    """The module's ``config.input_mode`` ('token' for families without input modes)."""
    return getattr(getattr(module, "config", None), "input_mode", "token")


def patch_size(module: nn.Module) -> int:
    """P in byte_patch mode, else 0 (no pending bytes are kept)."""
    if input_mode(module) == "byte_patch":
        return module.config.byte_patch.patch_size
    return 0


def vocab_size(module: nn.Module) -> int:
    return module.config.vocab_size


def start_state(module: nn.Module, batch: int, max_len: int) -> DecodeState:
    """The zero decoding state at position 0 for ``batch`` rows.

    ``max_len`` bounds prompt + generated tokens for cache-based families (ignored by
    recurrent ones such as qpf).
    """
    model = family_init_state(module)(module.config, batch, max_len)
    p = patch_size(module)
    return DecodeState(
        model=model,
        pending=jnp.full((batch, p), BYTE_PAD, jnp.int32),
        num_pending=jnp.zeros((), jnp.int32),
    )


# ------------------------------------------------------------------------ forward


def _forward(module: nn.Module, params: Params, inputs: Array, state: State):
    """(logits of the last position ``[B, V]``, new state); the LM head runs on that
    position only when the family returns pre-head features (``return_features``)."""
    out = apply_for_features(module, params, inputs, state, deterministic=True)
    if out.features is None:
        return out.logits[:, -1], out.state
    return head_logits(out.features[:, -1], out.head_weight), out.state


def _cast_like(new: State, ref: State) -> State:
    """Give ``new`` the dtypes of ``ref`` (branches of lax.switch / loop carries must match)."""
    return jax.tree.map(lambda n, r: jnp.asarray(n, r.dtype), new, ref)


@partial(jax.jit, static_argnums=(0,))
def forward_last(
    module: nn.Module, params: Params, inputs: Array, state: State
) -> tuple[Array, State]:
    """One compiled call: (logits of the last position ``[B, V]``, new model state)."""
    logits, new = _forward(module, params, inputs, state)
    return logits, _cast_like(new, state)


def step(
    module: nn.Module, params: Params, state: DecodeState, tokens: Array
) -> tuple[Array, DecodeState]:
    """Feed one token per row; pure and jittable.

    tokens: int ``[B]`` (``[B, 3]`` root/prefix/suffix in morphological mode).
    Returns (logits scoring the next token ``[B, V]``, new state).
    """
    p = patch_size(module)
    if p == 0:
        logits, model = _forward(module, params, tokens[:, None], state.model)
        model = _cast_like(model, state.model)
        return logits, DecodeState(model, state.pending, state.num_pending)

    k = state.num_pending  # bytes already pending; this byte goes to slot k
    pending = jax.lax.dynamic_update_slice_in_dim(
        state.pending, tokens[:, None].astype(jnp.int32), k, axis=1
    )

    def partial_patch(j: int):
        # j bytes pending, patch incomplete: within-patch decoder only, boundary state kept.
        def run(_):
            logits, _new = _forward(module, params, pending[:, :j], state.model)
            return logits, state.model, pending, jnp.asarray(j, jnp.int32)

        return run

    def complete_patch(_):
        logits, model = _forward(module, params, pending, state.model)
        cleared = jnp.full_like(pending, BYTE_PAD)
        return logits, _cast_like(model, state.model), cleared, jnp.zeros((), jnp.int32)

    branches = [partial_patch(j) for j in range(1, p)] + [complete_patch]
    logits, model, pending, count = jax.lax.switch(k, branches, None)
    return logits, DecodeState(model, pending, count)


# ------------------------------------------------------------------------ prefill


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, length)) for a in range(0, length, chunk)]


def prefill(
    module: nn.Module,
    params: Params,
    prompt: Array | np.ndarray,
    state: DecodeState | None = None,
    *,
    chunk_size: int | None = None,
    max_len: int | None = None,
) -> tuple[Array, DecodeState]:
    """Process a prompt in parallel (or in chunks with carried state).

    prompt: int ``[B, T]`` (T >= 1; ``[B, T, 3]`` in morphological mode).
    state: continue from this state; None starts at position 0 (``start_state`` with
      ``max_len``, default T + DEFAULT_MAX_NEW).
    chunk_size: process at most this many tokens per compiled call, so memory is flat in T
      (at most two compiled shapes: the chunk and the remainder). In byte_patch mode it
      must be a multiple of the patch size. None = one call.
    Returns (logits scoring the token after the prompt ``[B, V]``, state after the prompt).
    """
    prompt = jnp.asarray(prompt)
    batch, t = prompt.shape[:2]
    if t == 0:
        raise ValueError("prefill needs at least one token; start from start_state() instead")
    if state is None:
        state = start_state(module, batch, max_len if max_len is not None else t + DEFAULT_MAX_NEW)
    p = patch_size(module)
    if p:
        if chunk_size is not None and chunk_size % p:
            raise ConfigError(
                f"chunk_size = {chunk_size} is invalid in byte_patch mode: allowed a multiple "
                f"of the patch size {p}"
            )
        k = int(state.num_pending)  # bytes of an incomplete patch from an earlier call
        prompt = jnp.concatenate([state.pending[:, :k], prompt.astype(jnp.int32)], axis=1)
        t = prompt.shape[1]
    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"chunk_size = {chunk_size} is invalid: allowed an int > 0")
    aligned = t - t % p if p else t
    model = state.model
    logits = None
    for a, b in _chunks(aligned, chunk_size or max(aligned, 1)):
        logits, model = forward_last(module, params, prompt[:, a:b], model)
    if p == 0 or aligned == t:
        pending = jnp.full((batch, p), BYTE_PAD, jnp.int32)
        return logits, DecodeState(model, pending, jnp.zeros((), jnp.int32))
    tail = prompt[:, aligned:]  # the incomplete last patch: decoder only, boundary kept
    logits, _ = forward_last(module, params, tail, model)
    pending = jnp.pad(tail, ((0, 0), (0, p - tail.shape[1])), constant_values=BYTE_PAD)
    return logits, DecodeState(model, pending, jnp.asarray(tail.shape[1], jnp.int32))


# ------------------------------------------------------------------ beam row moves


def batch_axes(module: nn.Module, max_len: int) -> Any:
    """For each leaf of ``start_state``, the axis that indexes rows (-1: shared leaf).

    Found by comparing the state shapes for 1 and 2 rows, so it works for any family.
    """
    one = jax.eval_shape(lambda: start_state(module, 1, max_len))
    two = jax.eval_shape(lambda: start_state(module, 2, max_len))

    def axis(a, b) -> int:
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return diff[0] if diff else -1

    return jax.tree.map(axis, one, two)


def take_rows(state: DecodeState, rows: Array, axes: Any) -> DecodeState:
    """Gather rows ``rows [B']`` of every per-row leaf (beam reordering, tiling)."""
    return jax.tree.map(lambda x, ax: x if ax < 0 else jnp.take(x, rows, axis=ax), state, axes)
