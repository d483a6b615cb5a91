"""The jitted train and eval steps: pure functions of (state, batch), metrics kept on device.

One call of the train step is one optimizer update. Gradient accumulation splits the batch
into ``grad_accum`` micro-batches inside the step (``lax.scan``), and the CE term is
normalised by the whole batch's token count, so the update equals the un-accumulated one.
A non-finite loss or gradient leaves params and optimizer state untouched (no NaN ever
reaches a checkpoint); the host decides from the ``nonfinite`` metric whether to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from qpf.diagnostics import in_step
from qpf.models.family import apply_for_features
from qpf.training.objectives import LossConfig, objective_terms

Array = jax.Array
Batch = dict[str, Array]
Metrics = dict[str, Array]

# Logged per step besides the loss; each is a mean over micro-batches.
AUX_TERMS = ("ce", "coherence", "coupling", "energy", "affix", "qfe")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the optimizer step counter, params and optimizer state.

    insight: the Viveka carry (previous step's bank summary) when metrics are on, else None.
    """

    step: Array
    params: Any
    opt_state: Any
    insight: Any = None


def init_train_state(
    module: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    example: Array,
    insight: str = "off",
) -> TrainState:
    """Fresh parameters (from ``seed``) and optimizer state; ``example`` is an input batch.

    insight: the metrics mode of ``make_train_step`` (it decides whether a carry exists).
    """
    params = module.init(jax.random.key(seed), example)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        insight=in_step.init_carry(module, insight),
    )


def _split_micro(batch: Batch, n: int) -> Batch:
    """``[B, ...]`` -> ``[n, B/n, ...]`` for every array of the batch."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def _aux_zeros(tokens: Array) -> Metrics:
    """Zero accumulators of the per-micro-batch terms ``micro_loss`` returns.

    The affix term exists exactly for morphological batches (``[B, T, 3]`` tokens), so the
    structure is known without tracing the gradient (``jax.eval_shape`` would trace the
    whole model a second time).
    """
    names = [k for k in AUX_TERMS if k != "affix" or tokens.ndim == 3]
    return {k: jnp.zeros((), jnp.float32) for k in (*names, "ce_sum", "tokens")}


def make_train_step(
    module: nn.Module,
    tx: optax.GradientTransformation,
    loss_cfg: LossConfig,
    *,
    seed: int,
    grad_accum: int = 1,
    objective: Callable[..., dict[str, Array]] = objective_terms,
    insight: str = "off",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build ``step(state, batch) -> (state, metrics)`` (not yet jitted; jit it with
    ``donate_argnums=0`` so params and optimizer state are updated in place).

    batch: ``tokens`` int ``[B, T]`` (``[B, T, 3]`` morphological) and ``mask`` bool
    ``[B, T]``; B must divide by ``grad_accum``. Dropout keys derive from (seed, step,
    micro-batch), so a resumed run draws the same masks. The model is asked for pre-head
    features when its family offers them, so the CE runs through the fused head
    (``LossConfig.ce_impl``). ``objective`` (signature of ``objective_terms``) replaces
    the terms, e.g. to time the step without its LM head (``experiments.benchmark``).
    insight: 'on' / 'faithful' adds the philosophy metrics (``qpf.diagnostics``) and
    per-module gradient norms and update ratios to the metrics; the state must then come
    from ``init_train_state(..., insight=...)`` with the same mode.
    """
    if insight not in in_step.INSIGHT_MODES:
        raise ValueError(f"insight = {insight!r}: allowed {', '.join(in_step.INSIGHT_MODES)}")
    extra = in_step.wants_intermediates(module) if insight != "off" else {}

    def micro_loss(params, micro: Batch, rng: Array, total_tokens: Array, carry: Any):
        out = apply_for_features(
            module,
            {"params": params},
            micro["tokens"],
            deterministic=False,
            rngs={"dropout": rng},
            **extra,
        )
        terms = objective(out, micro["tokens"], micro["mask"], loss_cfg)
        aux = {k: terms[k] for k in AUX_TERMS if k in terms}
        if insight != "off":
            seen, summary = in_step.step_metrics(module, out, micro["mask"], carry, insight)
            aux.update(seen)
            if summary is not None:
                aux["_bank_summary"] = summary
        # CE is token-weighted over the whole batch; the other terms average micro-batches.
        loss = loss_cfg.ce * terms["ce_sum"] / total_tokens
        loss += (
            loss_cfg.coherence * aux["coherence"]
            + loss_cfg.coupling * aux["coupling"]
            + loss_cfg.energy * aux["energy"]
            + loss_cfg.affix * aux.get("affix", 0.0)
            + loss_cfg.qfe * aux["qfe"]
        ) / grad_accum
        aux = {**aux, "ce_sum": terms["ce_sum"], "tokens": terms["tokens"]}
        return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in aux.items()}

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def gradients(params, batch: Batch, base: Array, total_tokens: Array, carry: Any):
        if grad_accum == 1:
            rng = jax.random.fold_in(base, 0)
            (loss, aux), grads = grad_fn(params, batch, rng, total_tokens, carry)
            return grads, loss, aux
        micro = _split_micro(batch, grad_accum)

        def accumulate(acc, xs):
            grads, loss, aux = acc
            i, mb = xs
            rng = jax.random.fold_in(base, i)
            (l_i, a_i), g_i = grad_fn(params, mb, rng, total_tokens, carry)
            grads = jax.tree.map(jnp.add, grads, g_i)
            return (grads, loss + l_i, jax.tree.map(jnp.add, aux, a_i)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        if insight == "off":
            aux0 = _aux_zeros(batch["tokens"])
        else:  # the metric keys depend on the model: take them from an abstract evaluation
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(lambda: grad_fn(params, first, base, 1.0, carry)[0][1])
            aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        init = (zeros, jnp.zeros((), jnp.float32), aux0)
        (grads, loss, aux), _ = jax.lax.scan(accumulate, init, (jnp.arange(grad_accum), micro))
        return grads, loss, aux

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        total_tokens = jnp.maximum(batch["mask"][:, 1:].sum().astype(jnp.float32), 1.0)
        base = jax.random.fold_in(jax.random.key(seed), state.step)
        grads, loss, aux = gradients(state.params, batch, base, total_tokens, state.insight)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def skip(operands):
            return operands[0], operands[1]

        # A conditional, not a select over old and new trees: the update runs in place in
        # the donated buffers, and a non-finite step costs nothing but the branch.
        params, opt_state = jax.lax.cond(
            finite, update, skip, (state.params, state.opt_state, grads)
        )
        carry = state.insight
        if carry is not None and "_bank_summary" in aux:
            carry = {"bank_summary": aux["_bank_summary"] / grad_accum, "seen": jnp.array(True)}
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, insight=carry
        )
        metrics = {
            k: v / grad_accum
            for k, v in aux.items()
            if k in AUX_TERMS or (insight != "off" and "/" in k)
        }
        if insight != "off":
            metrics.update(in_step.norm_metrics(grads, state.params, params))
        metrics["ce"] = aux["ce_sum"] / total_tokens
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            tokens=aux["tokens"],
            nonfinite=(~finite).astype(jnp.int32),
        )
        return new_state, metrics

    return step


def make_eval_step(module: nn.Module, loss_cfg: LossConfig) -> Callable[[Any, Batch], Metrics]:
    """Build ``eval(params, batch) -> sums`` for token-weighted validation.

    Returns ce_sum (nats over counted targets), tokens (their count) and bytes (UTF-8 bytes
    those targets decode to, from the batch's ``target_bytes`` ``[B, T]``, for bits/byte).
    The CE is the same definition as in training (``objective_terms``).
    """

    def step(params: Any, batch: Batch) -> Metrics:
        out = apply_for_features(module, {"params": params}, batch["tokens"], deterministic=True)
        terms = objective_terms(out, batch["tokens"], batch["mask"], loss_cfg)
        tmask = batch["mask"][:, 1:]
        nbytes = jnp.where(tmask, batch["target_bytes"][:, 1:], 0).sum()
        return {"ce_sum": terms["ce_sum"], "tokens": terms["tokens"], "bytes": nbytes}

    return step
