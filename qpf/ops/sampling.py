"""Token sampling as pure, jittable functions over logits ``[B, V]``.

The pipeline (``sample``) is: repetition penalty -> temperature -> top-k -> top-p -> min-p ->
one categorical draw per row. Temperature 0 means greedy (argmax of the penalised logits;
the filters never remove the argmax, so they cannot change it).

Randomness is per row: ``row_keys(key, step, batch)`` folds the step and then the row index
into the key, so row i draws the same stream whatever the batch size and whatever the
other rows do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp

from qpf.errors import ConfigError

Array = jax.Array

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token (frozen and hashable: a static ``jax.jit`` argument).

    temperature: >= 0; 0 is greedy.
    top_k: keep the k most likely tokens; 0 disables.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p;
      in (0, 1], 1 disables.
    min_p: keep tokens with probability >= min_p · max probability; in [0, 1), 0 disables.
    repetition_penalty: > 0; tokens already present have positive logits divided and
      negative logits multiplied by it (1 disables, > 1 discourages repeats).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ConfigError:
            value = getattr(self, field)
            return ConfigError(f"SamplingConfig.{field} = {value!r} is invalid: allowed {allowed}")

        def number(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        if not (number(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a float >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)):
            raise bad("top_k", "an int >= 0 (0 = off)")
        if self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0 = off)")
        if not (number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise bad("top_p", "a float in (0, 1] (1 = off)")
        if not (number(self.min_p) and 0.0 <= self.min_p < 1.0):
            raise bad("min_p", "a float in [0, 1) (0 = off)")
        if not (number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a float > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


DEFAULT_SAMPLING = SamplingConfig()


# ----------------------------------------------------------------------------- keys


def row_keys(key: Array, step: Array | int, batch: int) -> Array:
    """Per-row keys ``[batch]`` for decoding step ``step``; row i's key ignores ``batch``."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch))


# ----------------------------------------------------------------------- transforms


def presence_from_tokens(tokens: Array, vocab_size: int, mask: Array | None = None) -> Array:
    """Token history ``[B, T]`` (optionally masked ``[B, T]`` bool) -> presence ``[B, V]``.

    A scatter, O(B·T + B·V) memory: a one-hot ``[B, T, V]`` would take 13 GB for a
    256K-token prompt with the GPT-2 vocabulary.
    """
    tokens = jnp.asarray(tokens)
    hit = jnp.ones(tokens.shape, jnp.int8) if mask is None else jnp.asarray(mask, jnp.int8)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    counts = jnp.zeros((tokens.shape[0], vocab_size), jnp.int8).at[rows, tokens].max(hit)
    return counts > 0


def apply_repetition_penalty(logits: Array, presence: Array, penalty: float) -> Array:
    """Divide positive and multiply negative logits of present tokens by ``penalty``.

    logits ``[B, V]``, presence ``[B, V]`` bool. Dividing a negative logit would *raise*
    it, so negatives are multiplied: both make a present token less likely when penalty > 1.
    """
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(presence, penalised, logits)


def _scatter_rows(values_sorted: Array, order: Array) -> Array:
    """Undo a per-row permutation: out[b, order[b, j]] = values_sorted[b, j]."""
    rows = jnp.arange(order.shape[0])[:, None]
    return jnp.zeros_like(values_sorted).at[rows, order].set(values_sorted)


def top_k_mask(logits: Array, k: int) -> Array:
    """Bool ``[B, V]``: exactly the k highest logits per row (ties broken by index)."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, jnp.bool_).at[rows, idx].set(True)


def top_p_mask(logits: Array, p: float) -> Array:
    """Bool ``[B, V]``: the smallest prefix of the sorted distribution with mass >= p.

    A token is kept when the mass strictly before it (in descending order) is < p, so the
    most likely token is always kept.
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return _scatter_rows(before < p, order)


def min_p_mask(logits: Array, min_p: float) -> Array:
    """Bool ``[B, V]``: tokens with probability >= min_p · (max probability)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return logp >= jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)


def filter_logits(logits: Array, config: SamplingConfig) -> Array:
    """Temperature, then top-k / top-p / min-p; removed tokens get -inf. ``[B, V]``.

    The dense reference of the filters (a full sort for top-p); ``sample`` computes the
    same kept set on the top-k candidates only.
    """
    x = logits.astype(jnp.float32)
    return _filter_dense(x if config.greedy else x / config.temperature, config)


def _filter_dense(x: Array, config: SamplingConfig) -> Array:
    """``filter_logits`` after the temperature: float32 ``[B, V]``."""
    candidates = x > NEG_INF  # tokens already at -inf (e.g. banned upstream) stay removed
    if config.top_k > 0:
        candidates &= top_k_mask(x, config.top_k)
    masked = jnp.where(candidates, x, NEG_INF)
    if config.top_p < 1.0:
        candidates &= top_p_mask(masked, config.top_p)
        masked = jnp.where(candidates, x, NEG_INF)
    if config.min_p > 0.0:
        candidates &= min_p_mask(masked, config.min_p)
        masked = jnp.where(candidates, x, NEG_INF)
    return masked


# ------------------------------------------------------------------- the fast path

# Without top-k, top-p first tries this many candidates and sorts the full row only when
# they hold less than top_p of the mass.
TOP_P_CANDIDATES = 1024


def token_noise(key: Array, ids: Array) -> Array:
    """Gumbel noise ``[K]`` of token ids ``[K]`` for one row's key: a function of (key, id).

    Noise tied to the token id rather than to a candidate slot lets the sampler draw it for
    its few candidates and still pick exactly the token a dense draw over the whole
    vocabulary would (``sample_reference`` uses the same noise). One threefry hash per id,
    as ``jax.random.categorical`` spends per vocabulary entry.
    """
    ids = ids.astype(jnp.uint32)
    counts = jnp.concatenate([jnp.zeros_like(ids), ids])  # word pairs (0, id)
    out = jax.extend.random.threefry_2x32(jax.random.key_data(key), counts)
    bits = out[: ids.shape[0]] ^ out[ids.shape[0] :]
    # 23 random mantissa bits -> uniform [0, 1) -> Gumbel, as jax.random.gumbel does.
    one = jnp.asarray(1.0, jnp.float32).view(jnp.uint32)
    u = jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0
    return -jnp.log(-jnp.log(jnp.maximum(u, jnp.finfo(jnp.float32).tiny)))


def _scaled(logits: Array, config: SamplingConfig, presence: Array | None) -> Array:
    """Penalised logits ``[B, V]`` in float32, divided by the temperature."""
    x = logits.astype(jnp.float32)
    if config.repetition_penalty != 1.0:
        if presence is None:
            raise ValueError("repetition_penalty != 1 needs a presence mask [B, V]")
        x = apply_repetition_penalty(x, presence, config.repetition_penalty)
    return x if config.greedy else x / config.temperature


def _filter_sorted(vals: Array, config: SamplingConfig, mass: Array | None = None) -> Array:
    """Top-p and min-p on candidates sorted descending ``[B, K]`` (-inf = removed).

    mass: probabilities of the candidates under the whole row (top-p without top-k);
    None = the candidates are the whole kept set (after top-k).
    """
    if config.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1) if mass is None else mass
        before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(before < config.top_p, vals, NEG_INF)
    if config.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p) (same normaliser)
        vals = jnp.where(vals >= vals[:, :1] + jnp.log(config.min_p), vals, NEG_INF)
    return vals


def _draw(vals: Array, ids: Array, keys: Array) -> Array:
    """The token with the largest kept logit + noise: ``[B, K]`` candidates -> ``[B]``."""
    noisy = vals + jax.vmap(token_noise)(keys, ids)
    pick = jnp.argmax(noisy, axis=-1)
    return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


def candidates(x: Array, config: SamplingConfig, k: int) -> tuple[Array, Array]:
    """The k best tokens of each row, filtered: (logits ``[B, k]`` with -inf for removed
    ones, sorted descending, and their ids ``[B, k]``). ``lax.top_k``: no sort of V."""
    vals, ids = jax.lax.top_k(x, min(k, x.shape[-1]))
    if config.top_k > 0:
        return _filter_sorted(vals, config), ids
    mass = jnp.exp(vals - jax.nn.logsumexp(x, axis=-1, keepdims=True))
    return _filter_sorted(vals, config, mass), ids


def sample(
    logits: Array,
    keys: Array,
    config: SamplingConfig,
    presence: Array | None = None,
) -> Array:
    """Draw one token per row (the same token as ``sample_reference`` for the same keys).

    logits ``[B, V]``; keys ``[B]`` (``row_keys``); presence ``[B, V]`` bool (tokens seen,
    for the repetition penalty; required when the penalty is not 1) -> int32 ``[B]``.
    With top-k the filters and the noise see only the k candidates; top-p alone tries the
    best ``TOP_P_CANDIDATES`` and sorts the row only if they hold too little mass.
    """
    x = _scaled(logits, config, presence)
    if config.greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    vocab = x.shape[-1]
    if config.top_k > 0:
        return _draw(*candidates(x, config, config.top_k), keys)
    if config.top_p < 1.0 and vocab > TOP_P_CANDIDATES:
        vals, ids = jax.lax.top_k(x, TOP_P_CANDIDATES)
        lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
        enough = jnp.all(jnp.sum(jnp.exp(vals - lse), axis=-1) >= config.top_p)
        return jax.lax.cond(
            enough,
            lambda: _draw(*candidates(x, config, TOP_P_CANDIDATES), keys),
            lambda: _draw(*candidates(x, config, vocab), keys),
        )
    if config.top_p < 1.0:
        return _draw(*candidates(x, config, vocab), keys)
    # No top-k / top-p: every token is a candidate (min-p is a threshold, no sort needed).
    ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), x.shape)
    if config.min_p > 0.0:
        x = jnp.where(x >= jnp.max(x, -1, keepdims=True) + jnp.log(config.min_p), x, NEG_INF)
    return _draw(x, ids, keys)


def sample_reference(
    logits: Array,
    keys: Array,
    config: SamplingConfig,
    presence: Array | None = None,
) -> Array:
    """Dense reference of ``sample``: every filter over the whole ``[B, V]`` row (a full
    sort for top-p), noise for every token. Same arguments and result."""
    x = _scaled(logits, config, presence)
    if config.greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    filtered = _filter_dense(x, config)
    ids = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return _draw(filtered, ids, keys)


def distribution(logits: Array, config: SamplingConfig, presence: Array | None = None) -> Array:
    """Probabilities ``[B, V]`` that ``sample`` draws from (computed on its candidates)."""
    x = _scaled(logits, config, presence)
    vocab = x.shape[-1]
    k = config.top_k if config.top_k > 0 else vocab
    vals, ids = candidates(x, config, k)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros(x.shape, jnp.float32).at[rows, ids].set(jax.nn.softmax(vals, axis=-1))
