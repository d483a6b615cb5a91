"""Streaming evaluation: log-probabilities of an input of any length in flat memory.

The input stays on the host; each compiled call takes a fixed ``[B, C]`` chunk of inputs,
its ``[B, C]`` targets (the inputs shifted by one, across chunk boundaries) and a mask,
and returns the target log-probabilities and the carried state. The final partial chunk is
padded to C and masked, so one shape is compiled; padding only follows the real tokens,
and the model is causal, so it cannot change a real position's logits (in byte_patch mode
the padded chunk is the last call, which the model allows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qpf.config import ConfigError
from qpf.generation.core import BYTE_PAD, Params, State, input_mode, patch_size, start_state

Array = jax.Array


@partial(jax.jit, static_argnums=(0,))
def chunk_logprobs(
    module: nn.Module, params: Params, state: State, inputs: Array, targets: Array
) -> tuple[Array, State]:
    """One chunk: inputs, targets int ``[B, C]`` -> (log p(target) ``[B, C]`` f32, state)."""
    out = module.apply(params, inputs, state, deterministic=True)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    new = jax.tree.map(lambda n, r: jnp.asarray(n, r.dtype), out.state, state)
    return picked, new


def stream_logprobs(
    module: nn.Module,
    params: Params,
    tokens: np.ndarray | Array,
    chunk_size: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (log p(token t+1 | tokens <= t) ``[B, c]``, mask ``[B, c]``) chunk by chunk.

    tokens: int ``[B, N]`` or ``[N]`` (host array; may be a memmap). The N - 1 targets are
    covered in order by chunks of ``chunk_size`` (a multiple of the patch size in
    byte_patch mode); the last chunk's padding is masked out (mask False).
    """
    if input_mode(module) == "morphological":
        raise ConfigError("stream evaluation supports one id per position, not morphological")
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if chunk_size <= 0:
        raise ConfigError(f"chunk_size = {chunk_size} is invalid: allowed an int > 0")
    p = patch_size(module)
    if p and chunk_size % p:
        raise ConfigError(
            f"chunk_size = {chunk_size} is invalid in byte_patch mode: allowed a multiple of "
            f"the patch size {p}"
        )
    batch, n = tokens.shape
    pad_id = BYTE_PAD if p else 0
    state = start_state(module, batch, n).model
    for a in range(0, n - 1, chunk_size):
        b = min(a + chunk_size, n - 1)
        inputs = np.full((batch, chunk_size), pad_id, np.int32)
        targets = np.zeros((batch, chunk_size), np.int32)
        inputs[:, : b - a] = tokens[:, a:b]
        targets[:, : b - a] = tokens[:, a + 1 : b + 1]
        logp, state = chunk_logprobs(module, params, state, inputs, targets)
        mask = np.zeros((batch, chunk_size), bool)
        mask[:, : b - a] = True
        yield np.asarray(logp), mask


@flax.struct.dataclass
class StreamStats:
    """Total negative log-likelihood (nats), target count and perplexity exp(nll / count)."""

    nll: float
    count: int
    perplexity: float


def evaluate_stream(
    module: nn.Module, params: Params, tokens: np.ndarray | Array, chunk_size: int
) -> StreamStats:
    """NLL of every next-token target of ``tokens`` (see ``stream_logprobs``); only running
    sums are kept, never the logits."""
    nll, count = 0.0, 0
    for logp, mask in stream_logprobs(module, params, tokens, chunk_size):
        nll -= float(np.sum(logp, where=mask, dtype=np.float64))
        count += int(mask.sum())
    return StreamStats(nll=nll, count=count, perplexity=math.exp(nll / max(count, 1)))
