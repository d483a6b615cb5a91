"""Generate from a trained run directory: the library side of ``experiments.generate``.

``stream_from_run`` yields text pieces as they are produced (sampling, greedy, or beam
search); ``generate_from_run`` returns the whole continuation. The prompt is prefilled in
chunks of ``chunk_size`` tokens with the carried state, so a prompt of any length costs
flat memory for recurrent models (qpf, diagrnn). A KV-cache model (the transformer) keeps
every position, so prompt + new tokens must fit its ``max_len``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qpf.config import ConfigError
from qpf.data.tokenizers import Tokenizer
from qpf.generation.core import input_mode, patch_size, prefill, start_state
from qpf.generation.decode import beam_search
from qpf.generation.text import generate_text
from qpf.ops.sampling import DEFAULT_SAMPLING, SamplingConfig
from qpf.training.restore import LoadedRun, load_run

DEFAULT_CHUNK = 4096  # prefill tokens per compiled call: flat memory, few compiled shapes


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """How to continue a prompt.

    max_new_tokens: at most this many tokens (fewer when EOS is drawn).
    sampling: temperature / top-k / top-p / min-p / repetition penalty (temperature 0 =
      greedy). seed: sample i draws from ``seed + i``.
    beam_width: > 1 runs beam search (deterministic; ``sampling`` is not used) and ranks
      the beams by log_prob / ((5 + length) / 6)^length_penalty.
    num_samples: independent samples sharing one prefill of the prompt.
    chunk_size: prompt tokens per compiled prefill call (a multiple of the patch size in
      byte_patch mode). block_size: tokens per compiled decode call between text pieces.
    """

    max_new_tokens: int = 256
    sampling: SamplingConfig = DEFAULT_SAMPLING
    seed: int = 0
    beam_width: int = 1
    length_penalty: float = 0.0
    num_samples: int = 1
    chunk_size: int = DEFAULT_CHUNK
    block_size: int = 1

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "beam_width", "num_samples", "chunk_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} = {value!r} is invalid: allowed an int >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed = {self.seed!r} is invalid: allowed an int >= 0")
        if self.beam_width > 1 and self.num_samples > 1:
            raise ConfigError("beam search returns one best continuation: use num_samples = 1")
        if not self.length_penalty >= 0:
            raise ConfigError(
                f"length_penalty = {self.length_penalty!r} is invalid: allowed a float >= 0"
            )


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from BOS (else EOS: a document start)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if ids:
        return ids
    for seed in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        if seed is not None:
            return [int(seed)]
    raise ConfigError(
        f"the prompt is empty and the tokenizer {tokenizer.name!r} has no BOS or EOS token to "
        "start from: give a non-empty prompt"
    )


def check_generatable(module: nn.Module, prompt_len: int, options: GenerateOptions) -> None:
    """Reject, before any compilation, what generation cannot do with this model."""
    config = module.config
    if input_mode(module) == "morphological":
        raise ConfigError("morphological input (root/prefix/suffix triples) has no sampler")
    episodic = getattr(config, "episodic", None)
    if episodic is not None and episodic.regime == "original":
        raise ConfigError(
            "episodic regime 'original' switches its rule with the total length, so it cannot "
            "be decoded incrementally; train with --set model.episodic.regime=chunked (or "
            "sliding)"
        )
    p = patch_size(module)
    if p and options.chunk_size % p:
        raise ConfigError(
            f"chunk_size = {options.chunk_size} is invalid for this byte-patch model: allowed "
            f"a multiple of the patch size {p}"
        )
    # A KV cache holds every position: the transformer's cache length is its max_len.
    max_len = getattr(config, "max_len", None)
    if max_len is not None and prompt_len + options.max_new_tokens > max_len:
        raise ConfigError(
            f"prompt of {prompt_len} tokens + {options.max_new_tokens} new tokens exceeds the "
            f"model's max_len {max_len}: shorten the prompt or lower --max-new-tokens"
        )


def prefill_reporting(
    module: nn.Module,
    params,
    row: jnp.ndarray,
    options: GenerateOptions,
    report: Callable[[str], None] | None = None,
):
    """``prefill`` of ``row`` [1, T] chunk by chunk with the carried state, reporting
    ``prefill: a/T tokens`` after each chunk when the prompt spans several chunks."""
    t = row.shape[1]
    max_len = t + options.max_new_tokens
    if report is None or t <= options.chunk_size:
        return prefill(module, params, row, chunk_size=options.chunk_size, max_len=max_len)
    state, out = start_state(module, 1, max_len), None
    for a in range(0, t, options.chunk_size):
        b = min(a + options.chunk_size, t)
        out = prefill(module, params, row[:, a:b], state, chunk_size=options.chunk_size)
        state = out[1]
        report(f"prefill: {b}/{t} prompt tokens ({100 * b // t}%)")
    return out


def stream_loaded(
    run: LoadedRun,
    prompt: str | Sequence[int],
    options: GenerateOptions = GenerateOptions(),
    report: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (sample index, text piece) as the continuation of ``prompt`` is generated.

    Samples come one after another (index 0, 1, ...), each opened by an empty piece
    ``(i, "")``; beam search yields its best beam once it has finished (beams are only
    ranked at the end). ``report`` (optional) receives status lines: prefill progress of a
    prompt longer than one chunk, and why each sample stopped.
    """
    tok = run.tokenizer
    ids = encode_prompt(tok, prompt)
    check_generatable(run.module, len(ids), options)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    row = jnp.asarray(np.asarray(ids, np.int32)[None])
    if options.beam_width > 1:
        out = beam_search(
            run.module,
            run.params,
            row,
            width=options.beam_width,
            max_new_tokens=options.max_new_tokens,
            length_penalty=options.length_penalty,
            eos_id=tok.eos_id,
            pad_id=pad_id,
            chunk_size=options.chunk_size,
        )
        n = int(out.lengths[0, 0])
        best = [int(t) for t in np.asarray(out.tokens[0, 0, :n])]
        if best and best[-1] == tok.eos_id:
            best = best[:-1]
        yield 0, ""
        yield 0, tok.decode(best)
        if report is not None:
            report(f"beam search finished: {len(best)} tokens")
        return
    # One prefill, shared by every sample (the state is an immutable value).
    prefilled = prefill_reporting(run.module, run.params, row, options, report)
    for i in range(options.num_samples):
        yield i, ""
        made = [0]  # tokens generated so far (EOS excluded), seen through decode_ids

        def decode(ids: Sequence[int], made: list[int] = made) -> str:
            made[0] = len(ids)
            return tok.decode(ids)

        pieces = generate_text(
            run.module,
            run.params,
            ids,
            decode_ids=decode,
            max_new_tokens=options.max_new_tokens,
            config=options.sampling,
            seed=options.seed + i,
            eos_id=tok.eos_id,
            pad_id=pad_id,
            block_size=options.block_size,
            prefilled=prefilled,
        )
        for piece in pieces:
            yield i, piece
        if report is not None:
            report(_stop_reason(i, made[0], options))


def _stop_reason(index: int, made: int, options: GenerateOptions) -> str:
    which = f"sample {index}: " if options.num_samples > 1 else ""
    if made < options.max_new_tokens:
        return f"{which}stopped at end-of-text after {made} tokens"
    return f"{which}stopped at --max-new-tokens ({made} tokens)"


def stream_from_run(
    run_dir: str | os.PathLike,
    prompt: str | Sequence[int],
    options: GenerateOptions = GenerateOptions(),
    *,
    checkpoint: str = "latest",
    data_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[int, str]]:
    """``stream_loaded`` after ``load_run(run_dir, checkpoint, data_dir)``."""
    yield from stream_loaded(load_run(run_dir, checkpoint, data_dir), prompt, options)


def generate_from_run(
    run_dir: str | os.PathLike,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    beam_width: int = 1,
    length_penalty: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK,
    checkpoint: str = "latest",
    data_dir: str | os.PathLike | None = None,
) -> str:
    """The continuation of ``prompt`` (text or token ids) by the run in ``run_dir``.

    Loads the ``checkpoint`` ('latest' or 'best') each call; for repeated calls load once
    with ``qpf.training.restore.load_run`` and use ``stream_loaded``.
    """
    options = GenerateOptions(
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        ),
        seed=seed,
        beam_width=beam_width,
        length_penalty=length_penalty,
        chunk_size=chunk_size,
    )
    pieces = stream_from_run(run_dir, prompt, options, checkpoint=checkpoint, data_dir=data_dir)
    return "".join(piece for _, piece in pieces)
