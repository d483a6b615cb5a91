"""Streaming text generation: yields decoded text pieces as tokens are produced."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qpf.config import ConfigError
from qpf.generation.core import DecodeState, Params, prefill
from qpf.generation.decode import decode
from qpf.ops.sampling import DEFAULT_SAMPLING, SamplingConfig, presence_from_tokens


def generate_text(
    module: nn.Module,
    params: Params,
    prompt: str | Sequence[int],
    *,
    encode: Callable[[str], Sequence[int]] | None = None,
    decode_ids: Callable[[Sequence[int]], str],
    max_new_tokens: int,
    config: SamplingConfig = DEFAULT_SAMPLING,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    block_size: int = 1,
    chunk_size: int | None = None,
    prefilled: tuple[jax.Array, DecodeState] | None = None,
) -> Iterator[str]:
    """Yield the text of each new token (batch 1) as it is generated.

    prompt: text (needs ``encode``) or token ids. decode_ids: ids -> text (any tokenizer's
    ``decode``). Tokens are generated ``block_size`` at a time by the compiled ``decode``
    loop (1 = lowest latency). Text is emitted only once it is stable: a piece that ends in
    an incomplete UTF-8 sequence (U+FFFD) waits for the next token. Stops at ``eos_id``
    (not yielded) or after ``max_new_tokens``.

    prefilled: (logits, state) that ``prefill`` already returned for this prompt (with
    ``max_len`` >= prompt + ``max_new_tokens``), so several samples can share one prefill
    of a long prompt; None prefills here, ``chunk_size`` tokens per compiled call.
    """
    ids = _prompt_ids(prompt, encode)
    if block_size < 1:
        raise ConfigError(f"block_size = {block_size} is invalid: allowed an int >= 1")
    if prefilled is None:
        prefilled = prefill(
            module,
            params,
            jnp.asarray(ids),
            chunk_size=chunk_size,
            max_len=ids.shape[1] + max_new_tokens,
        )
    blocks = _token_blocks(
        module,
        params,
        prefilled,
        ids,
        max_new_tokens=max_new_tokens,
        block_size=block_size,
        config=config,
        seed=seed,
        eos_id=eos_id,
        pad_id=pad_id,
    )
    yield from _stable_text(blocks, decode_ids)


def _prompt_ids(
    prompt: str | Sequence[int], encode: Callable[[str], Sequence[int]] | None
) -> np.ndarray:
    """The prompt as int32 ids ``[1, T]`` (a text prompt is encoded)."""
    if isinstance(prompt, str):
        if encode is None:
            raise ConfigError("a text prompt needs an encode callable (or pass token ids)")
        prompt = encode(prompt)
    return np.asarray(prompt, np.int32)[None]


def _token_blocks(
    module: nn.Module,
    params: Params,
    prefilled: tuple[jax.Array, DecodeState],
    ids: np.ndarray,
    *,
    max_new_tokens: int,
    block_size: int,
    config: SamplingConfig,
    seed: int,
    eos_id: int | None,
    pad_id: int,
) -> Iterator[list[int]]:
    """The new token ids of each compiled ``decode`` call of up to ``block_size`` tokens
    (an ending EOS dropped); stops after EOS, a shorter block or ``max_new_tokens``.

    A generator, so the next block is decoded only when the caller asks for more text.
    """
    logits, state = prefilled
    presence = presence_from_tokens(jnp.asarray(ids), logits.shape[-1])
    key = jax.random.key(seed)
    made = 0
    while made < max_new_tokens:
        n = min(block_size, max_new_tokens - made)
        out = decode(
            module,
            params,
            logits,
            state,
            key,
            max_new_tokens=n,
            config=config,
            eos_id=eos_id,
            pad_id=pad_id,
            presence=presence,
            start_step=made,
        )
        logits, state, presence = out.logits, out.state, out.presence
        length = int(out.lengths[0])
        new = [int(t) for t in np.asarray(out.tokens[0, :length])]
        made += n
        stopped = eos_id is not None and bool(new) and new[-1] == eos_id
        yield new[:-1] if stopped else new
        if stopped or length < n:
            return


def _stable_text(
    blocks: Iterator[list[int]], decode_ids: Callable[[Sequence[int]], str]
) -> Iterator[str]:
    """The text added by each block of tokens, held back while the decoded text ends in an
    incomplete UTF-8 sequence (U+FFFD); whatever is left is yielded at the end."""
    generated: list[int] = []
    emitted = ""  # text of ``generated`` already yielded
    for new in blocks:
        generated.extend(new)
        text = decode_ids(generated)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = decode_ids(generated)
    if len(text) > len(emitted):
        yield text[len(emitted) :]
