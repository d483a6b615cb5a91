"""Compiled generation loops: sampling with per-row EOS stopping, and beam search."""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf.config import ConfigError
from qpf.generation.core import (
    DecodeState,
    Params,
    batch_axes,
    input_mode,
    prefill,
    step,
    take_rows,
)
from qpf.ops.sampling import (
    DEFAULT_SAMPLING,
    SamplingConfig,
    presence_from_tokens,
    row_keys,
    sample,
)

Array = jax.Array


@flax.struct.dataclass
class DecodeResult:
    """tokens ``[B, N]`` (pad after a row's EOS and after an early stop); lengths ``[B]``
    (tokens generated, EOS included); logits ``[B, V]`` and state after the last token fed;
    presence ``[B, V]`` (tokens seen, for the repetition penalty of a continuation)."""

    tokens: Array
    lengths: Array
    logits: Array
    state: DecodeState
    presence: Array


def _check_token_mode(module: nn.Module) -> None:
    if input_mode(module) == "morphological":
        raise ConfigError(
            "generation needs one id per position; input_mode 'morphological' takes "
            "(root, prefix, suffix) triples and has no sampler"
        )


def decode(
    module: nn.Module,
    params: Params,
    logits: Array,
    state: DecodeState,
    key: Array,
    *,
    max_new_tokens: int,
    config: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    presence: Array | None = None,
    start_step: Array | int = 0,
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` tokens per row in one compiled ``lax.while_loop``.

    logits ``[B, V]`` and state: from ``prefill`` (or a previous ``decode``).
    key: PRNG key; token i of row r uses ``row_keys(key, start_step + i, B)[r]``.
    eos_id: a row that samples it stops (emits ``pad_id`` afterwards); the loop ends when
      every row has stopped. presence ``[B, V]``: tokens seen (default: none) for the
      repetition penalty; generated tokens are added to it. Compiled once per (module,
      max_new_tokens, config, shapes); eos_id, pad_id and start_step are traced.
    """
    _check_token_mode(module)
    if presence is None:
        presence = jnp.zeros(logits.shape, jnp.bool_)
    return _decode_loop(
        module,
        params,
        logits,
        state,
        key,
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),  # -1 never matches
        jnp.asarray(pad_id, jnp.int32),
        presence,
        jnp.asarray(start_step, jnp.int32),
        max_new_tokens=max_new_tokens,
        config=config,
    )


@partial(jax.jit, static_argnames=("module", "max_new_tokens", "config"))
def _decode_loop(
    module,
    params,
    logits,
    state,
    key,
    eos_id,
    pad_id,
    presence,
    start_step,
    *,
    max_new_tokens,
    config,
):
    batch = logits.shape[0]
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), jnp.bool_)
    lengths = jnp.zeros((batch,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, state, tokens, done, lengths, presence = carry
        keys = row_keys(key, start_step + i, batch)
        tok = jnp.where(done, pad_id, sample(logits, keys, config, presence))
        tokens = tokens.at[:, i].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        # One element per row, not a dense [B, V] one-hot: the update stays in place.
        presence = presence.at[jnp.arange(batch), tok].max(~done)
        done = done | (tok == eos_id)
        logits, state = step(module, params, state, tok)
        return i + 1, logits.astype(carry[1].dtype), state, tokens, done, lengths, presence

    carry = (jnp.zeros((), jnp.int32), logits, state, tokens, done, lengths, presence)
    _, logits, state, tokens, _, lengths, presence = jax.lax.while_loop(cond, body, carry)
    return DecodeResult(tokens, lengths, logits, state, presence)


def generate(
    module: nn.Module,
    params: Params,
    prompt: Array,
    key: Array,
    *,
    max_new_tokens: int,
    config: SamplingConfig = DEFAULT_SAMPLING,
    eos_id: int | None = None,
    pad_id: int = 0,
    chunk_size: int | None = None,
) -> DecodeResult:
    """prefill + decode for a prompt ``[B, T]``; the prompt's tokens seed the presence mask."""
    _check_token_mode(module)
    prompt = jnp.asarray(prompt, jnp.int32)
    logits, state = prefill(
        module, params, prompt, chunk_size=chunk_size, max_len=prompt.shape[1] + max_new_tokens
    )
    presence = presence_from_tokens(prompt, logits.shape[-1])
    return decode(
        module,
        params,
        logits,
        state,
        key,
        max_new_tokens=max_new_tokens,
        config=config,
        eos_id=eos_id,
        pad_id=pad_id,
        presence=presence,
    )


# ---------------------------------------------------------------------- beam search


@flax.struct.dataclass
class BeamResult:
    """tokens ``[B, W, N]``; scores ``[B, W]`` (length-penalised, sorted best first);
    log_probs ``[B, W]`` (summed token log-probabilities); lengths ``[B, W]`` (EOS
    included)."""

    tokens: Array
    scores: Array
    log_probs: Array
    lengths: Array


def length_normaliser(lengths: Array, alpha: float) -> Array:
    """GNMT length penalty ((5 + len) / 6)^alpha; alpha 0 ranks by raw log-probability."""
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


@partial(
    jax.jit,
    static_argnames=("module", "width", "max_new_tokens", "eos_id", "pad_id", "axes"),
)
def _beam_loop(module, params, logits, state, *, width, max_new_tokens, eos_id, pad_id, axes):
    axes = jax.tree.unflatten(axes[0], axes[1])
    rows_, vocab = logits.shape
    batch = rows_ // width
    scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (width - 1), jnp.float32), (batch, 1))
    tokens = jnp.full((batch, width, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch, width), jnp.bool_)
    lengths = jnp.zeros((batch, width), jnp.int32)
    # A finished beam continues only with pad at no cost, so its score is frozen.
    frozen = jnp.full((vocab,), -jnp.inf).at[pad_id].set(0.0)

    def body(i, carry):
        logits, state, scores, tokens, done, lengths = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(batch, width, vocab)
        logp = jnp.where(done[..., None], frozen, logp)
        total = (scores[..., None] + logp).reshape(batch, width * vocab)
        scores, flat = jax.lax.top_k(total, width)
        beam, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        pick = partial(jnp.take_along_axis, indices=beam, axis=1)
        was_done = pick(done)
        tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1).at[:, :, i].set(tok)
        lengths = pick(lengths) + (~was_done).astype(jnp.int32)
        done = was_done | (tok == eos_id) if eos_id is not None else was_done
        rows = (jnp.arange(batch)[:, None] * width + beam).reshape(-1)
        state = take_rows(state, rows, axes)
        logits, state = step(module, params, state, tok.reshape(-1))
        return logits, state, scores, tokens, done, lengths

    carry = (logits, state, scores, tokens, done, lengths)
    _, _, scores, tokens, _, lengths = jax.lax.fori_loop(0, max_new_tokens, body, carry)
    return tokens, scores, lengths


def beam_search(
    module: nn.Module,
    params: Params,
    prompt: Array,
    *,
    width: int,
    max_new_tokens: int,
    length_penalty: float = 0.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    chunk_size: int | None = None,
) -> BeamResult:
    """Beam search of ``width`` beams per prompt row ``[B, T]``; beams are batch rows.

    Candidates are ranked by summed log-probability while searching; the final beams are
    sorted by log_prob / ((5 + length) / 6)^length_penalty. A beam that emits ``eos_id``
    is finished and keeps its score.
    """
    _check_token_mode(module)
    if width < 1:
        raise ConfigError(f"beam width = {width} is invalid: allowed an int >= 1")
    prompt = jnp.asarray(prompt, jnp.int32)
    batch = prompt.shape[0]
    max_len = prompt.shape[1] + max_new_tokens
    logits, state = prefill(module, params, prompt, chunk_size=chunk_size, max_len=max_len)
    if width > logits.shape[-1]:
        raise ConfigError(f"beam width = {width} exceeds the vocabulary {logits.shape[-1]}")
    axes = batch_axes(module, max_len)
    tiled = jnp.repeat(jnp.arange(batch), width)
    state = take_rows(state, tiled, axes)
    leaves, treedef = jax.tree.flatten(axes)
    tokens, log_probs, lengths = _beam_loop(
        module,
        params,
        jnp.take(logits, tiled, axis=0),
        state,
        width=width,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        axes=(treedef, tuple(leaves)),
    )
    scores = log_probs / length_normaliser(lengths, length_penalty)
    order = jnp.argsort(-scores, axis=1)
    take = partial(jnp.take_along_axis, indices=order, axis=1)
    return BeamResult(
        tokens=jnp.take_along_axis(tokens, order[..., None], axis=1),
        scores=take(scores),
        log_probs=take(log_probs),
        lengths=take(lengths),
    )
