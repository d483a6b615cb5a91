"""Generation for qllm_v2: UTF-8 bytes, the original's sampler with its "quantum-aware"
filter (faithful), and a sane sampler (spec v2_v3.md §A6, §A11).

* ``encode_bytes`` / ``decode_bytes``: UTF-8 bytes as ids 0..255 (lossless; the original
  encodes prompts with ``ord`` and decodes with ``chr``, which garbles non-ASCII text).
* ``faithful_filter_bonus``: for every candidate byte v, the phase representation of
  (sequence + v) scored by mean |z| over the last 3 positions (the mean |tanh| amplitude),
  turned into a bonus 0.5·σ(score − mean score). One batched forward of V candidates
  instead of the original's V sequential ones; same numbers.
* ``original_logit_filter``: T, the original's repetition penalty (divides every seen id's
  logit, which *raises* negative ones), then top-k, top-p and min-p (logit >= max + ln p).
* ``sane_logit_filter``: T, a sign-aware repetition penalty (divide positive, multiply
  negative logits), then top-k, top-p, min-p.
* ``faithful_generate``: the original loop: recompute the whole sequence each step, filter
  from the second new token on, sample. Host loop (the sequence length changes each step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qpf.models.qllm_v2 import QLLMv2

Array = jax.Array
NEG = -1e30


def encode_bytes(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as ids 0..255."""
    return list(text.encode("utf-8"))


def decode_bytes(ids: Sequence[int]) -> str:
    """Ids 0..255 -> text (invalid UTF-8 replaced); ids >= 256 (specials) are dropped."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _top_k_p_min_p(logits: Array, top_k: int, top_p: float, min_p: float) -> Array:
    """Mask logits ``[V]`` outside top-k, the top-p nucleus and min-p (logit >= max + ln p)."""
    if 0 < top_k < logits.shape[-1]:
        kth = jnp.sort(logits)[-top_k]
        logits = jnp.where(logits < kth, NEG, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        in_nucleus_sorted = jnp.cumsum(probs) - probs < top_p  # always keeps the first
        in_nucleus = jnp.zeros_like(in_nucleus_sorted).at[order].set(in_nucleus_sorted)
        logits = jnp.where(in_nucleus, logits, NEG)
    if min_p > 0.0:
        logits = jnp.where(logits >= jnp.max(logits) + math.log(min_p), logits, NEG)
    return logits


def original_logit_filter(
    logits: Array,
    seen: Array,
    temperature: float = 0.7,
    repetition: float = 1.1,
    top_k: int = 50,
    top_p: float = 0.9,
    min_p: float = 0.05,
    bonus: Array | None = None,
) -> Array:
    """The original's filter of next-token logits ``[V]``; seen bool ``[V]``."""
    logits = logits / temperature
    logits = jnp.where(seen, logits / repetition, logits)
    if bonus is not None:
        logits = logits + bonus
    return _top_k_p_min_p(logits, top_k, top_p, min_p)


def sane_logit_filter(
    logits: Array,
    seen: Array,
    temperature: float = 0.7,
    repetition: float = 1.1,
    top_k: int = 50,
    top_p: float = 0.9,
    min_p: float = 0.05,
) -> Array:
    """Sign-aware repetition penalty (a seen id always loses probability), then filters."""
    logits = logits / temperature
    penalised = jnp.where(logits > 0, logits / repetition, logits * repetition)
    return _top_k_p_min_p(jnp.where(seen, penalised, logits), top_k, top_p, min_p)


def faithful_filter_bonus(model: QLLMv2, params: dict, seq: Array) -> Array:
    """0.5·σ(score − mean score) per candidate ``[V]``; seq int ``[T]``.

    score_v = mean |z| over the last 3 positions of phase_representation(seq + v).
    """
    v = model.config.vocab_size
    cands = jnp.concatenate(
        [jnp.broadcast_to(seq[None], (v, seq.shape[0])), jnp.arange(v)[:, None]], axis=1
    )
    amp, _ = model.apply(params, cands, method=QLLMv2.phase_representation)
    score = jnp.mean(jnp.abs(amp[:, -3:]), axis=(1, 2))
    return 0.5 * jax.nn.sigmoid(score - jnp.mean(score))


def faithful_generate(
    model: QLLMv2,
    params: dict,
    prompt: str,
    max_new_tokens: int,
    key: Array,
    temperature: float = 0.7,
    repetition: float = 1.1,
    top_k: int = 50,
    top_p: float = 0.9,
    min_p: float = 0.05,
    quantum_filter: bool = True,
) -> str:
    """The original's generation loop on UTF-8 bytes (no cache; bounded by max_seq_len)."""
    ids = encode_bytes(prompt)
    limit = model.config.max_seq_len
    fwd = jax.jit(lambda p, x: model.apply(p, x[None]).logits[0, -1])
    bonus_fn = jax.jit(lambda p, x: faithful_filter_bonus(model, p, x))
    for i in range(max_new_tokens):
        seq = jnp.asarray(ids[-limit:], jnp.int32)
        if quantum_filter and i >= 1 and seq.shape[0] < limit:
            bonus = bonus_fn(params, seq)
        else:
            bonus = None
        seen = jnp.zeros((model.config.vocab_size,), bool).at[seq].set(True)
        logits = original_logit_filter(
            fwd(params, seq), seen, temperature, repetition, top_k, top_p, min_p, bonus
        )
        key, sub = jax.random.split(key)
        ids.append(int(jax.random.categorical(sub, logits)))
    return decode_bytes(np.asarray(ids))
