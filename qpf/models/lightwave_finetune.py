"""Fine-tuning LLM Lightwave as the original does: LoRA with a frozen base, and REINFORCE.

LoRA (``--lora``, spec other_seeds §1.7): adapters on the four modulator projections and the
readout; the original trains only parameters whose names contain ``lora_``, ``coupling`` or
``norm_scale``. Here the freeze is an optax partition (``freeze``): frozen leaves go
through ``optax.set_to_zero`` and the trainable ones through the real optimizer inside
``optax.masked``, so frozen parameters get no update and no optimizer state at all (for a
readout-dominated model that is >99% of Adam's memory saved).

REINFORCE (``--rl_train``): for each prompt, sample a continuation (≤ max_new tokens, stop
at EOT) at a low temperature, score the decoded continuation with the original's heuristic
reward (``original_reward``) and minimise −R·Σ_t log π(a_t) averaged over the prompts (no
baseline, so every sample with R > 0 is reinforced; spec §1.11.6). Only parameters whose
names contain ``modulator``, ``coupling`` or ``norm_scale`` train. The log-probabilities are
recomputed by one teacher-forced forward over prompt + continuation: the gradient equals
the original's gradient through its sampling loop (the sampled tokens are constants), and
it avoids back-propagating through a while loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

Array = jax.Array
Params = Any

LORA_TRAINABLE = ("lora_", "coupling", "norm_scale")
RL_TRAINABLE = ("modulator", "coupling", "norm_scale")


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Params, patterns: Sequence[str]) -> Any:
    """Bool pytree like ``params``: True where the parameter's path contains a pattern."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(p in _path_name(path) for p in patterns), params
    )


def freeze(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``mask`` is True; zero updates and no state elsewhere."""
    labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def state_leaf_count(opt_state: Any) -> int:
    """Number of array elements held by an optimizer state (for memory checks)."""
    return sum(int(x.size) for x in jax.tree.leaves(opt_state) if hasattr(x, "size"))


def with_lora(base: Params, lora_init: Params) -> Params:
    """Base weights copied into a LoRA-enabled model's params (new adapters kept).

    base / lora_init: ``{'params': ...}`` of the same config without / with ``use_lora``.
    Every base leaf must exist in ``lora_init`` with the same shape.
    """

    def merge(b: Any, target: Any) -> Any:
        if isinstance(target, dict):
            extra = set(b) - set(target)
            if extra:
                raise ValueError(f"base parameters missing in the LoRA model: {sorted(extra)}")
            return {k: merge(b[k], v) if k in b else v for k, v in target.items()}
        if b.shape != target.shape:
            raise ValueError(f"shape {b.shape} != {target.shape}")
        return b

    return merge(base, lora_init)


def next_token_ce(module: nn.Module, params: Params, ids: Array, pad_id: int) -> Array:
    """The original's training loss: mean CE over non-pad targets. ids ``[B, T]``."""
    from qpf.models.lightwave import lightwave_losses

    return lightwave_losses(module.apply(params, ids).logits, ids, pad_id)["ce"]


def make_lora_step(
    module: nn.Module, tx: optax.GradientTransformation, pad_id: int
) -> Callable[[Params, Any, Array], tuple[Params, Any, Array]]:
    """A jitted CE step (params, opt_state, ids) -> (params, opt_state, loss)."""

    @jax.jit
    def step(params: Params, opt_state: Any, ids: Array) -> tuple[Params, Any, Array]:
        loss, grads = jax.value_and_grad(lambda p: next_token_ce(module, p, ids, pad_id))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# ------------------------------------------------------------------ REINFORCE


def original_reward(text: str, prompt: str) -> float:
    """The original's ``RewardVerifier.get_reward`` on a decoded continuation.

    +1 if 50 < len(text) < 300; +2·(unique-word ratio) if more than 10 words; +1.5 if more
    than 5 words are not in the prompt; +1 if the stripped text ends with . ! or ?. (The
    original indexes ``text.strip()[-1]`` and crashes on an empty continuation; here an empty
    text simply gets no termination bonus.)
    """
    reward = 0.0
    if 50 < len(text) < 300:
        reward += 1.0
    words = text.lower().split()
    if len(words) > 10:
        reward += 2.0 * len(set(words)) / len(words)
    if len(set(words) - set(prompt.lower().split())) > 5:
        reward += 1.5
    stripped = text.strip()
    if stripped and stripped[-1] in ".!?":
        reward += 1.0
    return reward


def continuation_logprob(
    module: nn.Module,
    params: Params,
    ids: Array,
    prompt_lens: Array,
    lengths: Array,
    temperature: float,
) -> Array:
    """Σ_t log π(a_t) per row of the continuation ids[i, P_i : P_i + n_i] under
    softmax(logits/temperature), from one teacher-forced forward.

    ids ``[N, T]`` int (prompt, continuation, any padding after it); prompt_lens /
    lengths ``[N]`` -> ``[N]``.
    """
    logits = module.apply(params, ids).logits[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    tok_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # scores ids[t+1]
    t = jnp.arange(ids.shape[1] - 1)[None]
    start = prompt_lens[:, None] - 1
    in_cont = (t >= start) & (t < start + lengths[:, None])
    return jnp.sum(jnp.where(in_cont, tok_logp, 0.0), axis=-1)


def reinforce_loss(
    module: nn.Module,
    params: Params,
    ids: Array,
    prompt_lens: Array,
    lengths: Array,
    rewards: Array,
    temperature: float,
) -> Array:
    """mean_i −R_i·Σ_t log π(a_t) (the original's REINFORCE loss, no baseline).

    ids ``[N, T]``; prompt_lens / lengths / rewards ``[N]``.
    """
    logp = continuation_logprob(module, params, ids, prompt_lens, lengths, temperature)
    return jnp.mean(-rewards * logp)


def sample_continuation(
    step: Callable[[Params, Any, Array], tuple[Array, Any]],
    params: Params,
    state: Any,
    prompt: Sequence[int],
    key: Array,
    max_new: int,
    temperature: float,
    eos_id: int,
) -> list[int]:
    """The original's rollout: prefill token by token, then sample at ``temperature``
    until EOT (included) or ``max_new`` tokens. ``step(params, state, token [1, 1])`` ->
    (logits ``[1, V]``, state), jitted by the caller (one shape: compiles once)."""
    logits = None
    for tok in prompt:
        logits, state = step(params, state, jnp.asarray([[tok]], jnp.int32))
    out: list[int] = []
    for _ in range(max_new):
        key, sub = jax.random.split(key)
        tok = int(jax.random.categorical(sub, logits[0].astype(jnp.float32) / temperature))
        out.append(tok)
        if tok == eos_id:
            break
        logits, state = step(params, state, jnp.asarray([[tok]], jnp.int32))
    return out
