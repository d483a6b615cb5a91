"""The jitted train and eval steps: pure functions of (state, batch), metrics kept on device.

One call of the train step is one optimizer update. Gradient accumulation splits the batch
into ``grad_accum`` strided micro-batches inside the step (``lax.scan``; micro-batch i is rows
``i::grad_accum``, so under data parallelism no row changes device), and the CE term is
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
from qpf.models.family import apply_for_features, check_segment_resets
from qpf.training.objectives import LossConfig, objective_terms
from qpf.zoo import family_of

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


def split_micro_batches(batch: Batch, n: int) -> Batch:
    """``[B, ...]`` -> ``[n, B/n, ...]`` for every array; micro-batch i is rows ``i::n``.

    Strided, not contiguous: under data parallelism each device holds a contiguous block of
    rows, and a block of B/d rows (B/d divisible by n) holds B/(d·n) rows of every
    micro-batch, so each micro-batch is already sharded over all devices and no row moves.
    A contiguous split would put whole micro-batches on single devices and reshard them.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


# micro_loss(params, micro_batch, rng, total_tokens, carry) -> (loss, aux)
MicroLoss = Callable[[Any, Batch, Array, Array, Any], tuple[Array, Metrics]]
# gradients(params, batch, base_rng, total_tokens, carry) -> (grads, loss, aux sums)
Gradients = Callable[[Any, Batch, Array, Array, Any], tuple[Any, Array, Metrics]]


def segment_kwargs(module: nn.Module, batch: Batch) -> dict[str, Array]:
    """``{"segment_ids": [B, T]}`` when the batch carries document ids (``DataConfig.
    segment_ids``), else ``{}`` (the call is then exactly as without them). A family that
    does not reset at document starts raises ``ConfigError`` naming the fix."""
    if "segment_ids" not in batch:
        return {}
    check_segment_resets(family_of(module.config), module.config)
    return {"segment_ids": batch["segment_ids"]}


def _weighted_loss(loss_cfg: LossConfig, terms: Metrics, total_tokens: Array, n: int) -> Array:
    """This micro-batch's share of the step loss (summed over micro-batches = the loss).

    CE is token-weighted over the whole batch (``total_tokens``), so its sum is exact; the
    other terms are means per micro-batch and are averaged over the ``n`` micro-batches.
    """
    loss = loss_cfg.ce * terms["ce_sum"] / total_tokens
    return (
        loss
        + (
            loss_cfg.coherence * terms["coherence"]
            + loss_cfg.coupling * terms["coupling"]
            + loss_cfg.energy * terms["energy"]
            + loss_cfg.affix * terms.get("affix", 0.0)
            + loss_cfg.qfe * terms["qfe"]
        )
        / n
    )


def _make_micro_loss(
    module: nn.Module,
    loss_cfg: LossConfig,
    objective: Callable[..., dict[str, Array]],
    insight: str,
    grad_accum: int,
) -> MicroLoss:
    """The differentiated function: one micro-batch's loss share and its float32 aux terms."""
    extra = in_step.wants_intermediates(module) if insight != "off" else {}

    def micro_loss(params, micro: Batch, rng: Array, total_tokens: Array, carry: Any):
        out = apply_for_features(
            module,
            {"params": params},
            micro["tokens"],
            deterministic=False,
            rngs={"dropout": rng},
            **extra,
            **segment_kwargs(module, micro),
        )
        terms = objective(out, micro["tokens"], micro["mask"], loss_cfg)
        aux = {k: terms[k] for k in AUX_TERMS if k in terms}
        if insight != "off":
            seen, summary = in_step.step_metrics(module, out, micro["mask"], carry, insight)
            aux.update(seen)
            if summary is not None:
                aux["_bank_summary"] = summary
        loss = _weighted_loss(loss_cfg, terms, total_tokens, grad_accum)
        aux = {**aux, "ce_sum": terms["ce_sum"], "tokens": terms["tokens"]}
        return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in aux.items()}

    return micro_loss


def _make_gradients(micro_loss: MicroLoss, grad_accum: int) -> Gradients:
    """Gradients, loss and aux sums over the ``grad_accum`` micro-batches of a batch.

    The model is traced once either way: micro-batches run in a ``lax.scan`` whose carry is
    only the gradient sum (shaped like params); per-micro-batch loss and aux come out as the
    scan's stacked outputs and are summed after it, so their structure (model-dependent under
    ``insight``) never has to be known in advance, and no ``eval_shape`` trace is needed.
    """
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def gradients(params, batch: Batch, base: Array, total_tokens: Array, carry: Any):
        if grad_accum == 1:
            rng = jax.random.fold_in(base, 0)
            (loss, aux), grads = grad_fn(params, batch, rng, total_tokens, carry)
            return grads, loss, aux

        def accumulate(grads, xs):
            i, micro = xs
            rng = jax.random.fold_in(base, i)
            (loss, aux), g = grad_fn(params, micro, rng, total_tokens, carry)
            return jax.tree.map(jnp.add, grads, g), (loss, aux)

        xs = (jnp.arange(grad_accum), split_micro_batches(batch, grad_accum))
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, auxes) = jax.lax.scan(accumulate, zeros, xs)
        return grads, losses.sum(), jax.tree.map(lambda x: x.sum(0), auxes)

    return gradients


def _update_if_finite(
    tx: optax.GradientTransformation, state: TrainState, grads: Any, loss: Array
) -> tuple[Any, Any, Array, Array]:
    """(params, opt_state, finite, grad_norm): the optimizer update, skipped when the loss or
    the gradient norm is not finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(operands):
        params, opt_state, grads = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def skip(operands):
        return operands[0], operands[1]

    # A conditional, not a select over old and new trees: the update runs in place in the
    # donated buffers, and a non-finite step costs nothing but the branch.
    params, opt_state = jax.lax.cond(finite, update, skip, (state.params, state.opt_state, grads))
    return params, opt_state, finite, grad_norm


def _next_insight_carry(carry: Any, aux: Metrics, grad_accum: int) -> Any:
    """The Viveka carry for the next step: this step's mean bank summary, when there is one."""
    if carry is None or "_bank_summary" not in aux:
        return carry
    return {"bank_summary": aux["_bank_summary"] / grad_accum, "seen": jnp.array(True)}


def _step_metrics(
    aux: Metrics,
    loss: Array,
    grad_norm: Array,
    finite: Array,
    total_tokens: Array,
    grad_accum: int,
    insight: str,
) -> Metrics:
    """The logged scalars: aux terms averaged over micro-batches, CE over the whole batch."""
    metrics = {
        k: v / grad_accum
        for k, v in aux.items()
        if k in AUX_TERMS or (insight != "off" and "/" in k)
    }
    metrics["ce"] = aux["ce_sum"] / total_tokens
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        tokens=aux["tokens"],
        nonfinite=(~finite).astype(jnp.int32),
    )
    return metrics


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
    ``[B, T]`` (and ``segment_ids`` int ``[B, T]`` when the data emits them: passed to the
    model, see ``segment_kwargs``); B must divide by ``grad_accum`` (micro-batch i is rows
    ``i::grad_accum``).
    Dropout keys derive from (seed, step, micro-batch), so a resumed run draws the same
    masks. The model is asked for pre-head features when its family offers them, so the CE
    runs through the fused head (``LossConfig.ce_impl``). ``objective`` (signature of
    ``objective_terms``) replaces the terms, e.g. to time the step without its LM head
    (``experiments.benchmark``). insight: 'on' / 'faithful' adds the philosophy metrics
    (``qpf.diagnostics``) and per-module gradient norms and update ratios to the metrics;
    the state must then come from ``init_train_state(..., insight=...)`` with the same mode.
    """
    if insight not in in_step.INSIGHT_MODES:
        raise ValueError(f"insight = {insight!r}: allowed {', '.join(in_step.INSIGHT_MODES)}")
    micro_loss = _make_micro_loss(module, loss_cfg, objective, insight, grad_accum)
    gradients = _make_gradients(micro_loss, grad_accum)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        total_tokens = jnp.maximum(batch["mask"][:, 1:].sum().astype(jnp.float32), 1.0)
        base = jax.random.fold_in(jax.random.key(seed), state.step)
        grads, loss, aux = gradients(state.params, batch, base, total_tokens, state.insight)
        params, opt_state, finite, grad_norm = _update_if_finite(tx, state, grads, loss)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            insight=_next_insight_carry(state.insight, aux, grad_accum),
        )
        metrics = _step_metrics(aux, loss, grad_norm, finite, total_tokens, grad_accum, insight)
        if insight != "off":
            metrics.update(in_step.norm_metrics(grads, state.params, params))
        return new_state, metrics

    return step


def make_eval_step(module: nn.Module, loss_cfg: LossConfig) -> Callable[[Any, Batch], Metrics]:
    """Build ``eval(params, batch) -> sums`` for token-weighted validation.

    Returns ce_sum (nats over counted targets), tokens (their count) and bytes (UTF-8 bytes
    those targets decode to, from the batch's ``target_bytes`` ``[B, T]``, for bits/byte).
    The CE is the same definition as in training (``objective_terms``).
    """

    def step(params: Any, batch: Batch) -> Metrics:
        out = apply_for_features(
            module,
            {"params": params},
            batch["tokens"],
            deterministic=True,
            **segment_kwargs(module, batch),
        )
        terms = objective_terms(out, batch["tokens"], batch["mask"], loss_cfg)
        tmask = batch["mask"][:, 1:]
        nbytes = jnp.where(tmask, batch["target_bytes"][:, 1:], 0).sum()
        return {"ce_sum": terms["ce_sum"], "tokens": terms["tokens"], "bytes": nbytes}

    return step
