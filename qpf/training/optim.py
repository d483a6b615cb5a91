"""The optimizer: AdamW with a weight-decay mask, warmup + cosine by optimizer steps, clipping.

Upstream decayed every parameter (norm gains, damping, rotations included), had no warmup and
counted its cosine in micro-batches (spec §13). Here the schedule's step is the optimizer
step (gradient accumulation happens inside the train step, so one call = one update), and
weight decay applies only to matrices and tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from qpf.config import nonnegative_int, one_of, positive_int, rate, require
from qpf.training.rgd import rgd

OPTIMIZERS = ("adamw", "rgd")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters.

    lr: peak learning rate (None: the preset's). warmup_steps: linear warmup from 0.
    min_lr_ratio: cosine floor as a fraction of lr. clip_norm: global-norm clip (0 = off).
    grad_accum: micro-batches per optimizer step (the batch is split along its rows).
    name: 'adamw' or 'rgd' (Resonant Gradient Descent, ``qpf.training.rgd``: AdamW plus a
      2-D FFT gate of the update of every rank >= 2 parameter; resonance_strength s in
      [0, 1], reached linearly over resonance_warmup optimizer steps).
    decay_steps: the cosine's horizon in optimizer steps; None = the run's ``train.steps``
      when it starts (recorded then, so a resumed or extended run keeps its schedule).
    """

    lr: float | None = None
    decay_steps: int | None = None
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    name: str = "adamw"
    resonance_strength: float = 0.3
    resonance_warmup: int = 500

    def __post_init__(self) -> None:
        require(self.lr is None or self.lr > 0, self, "lr", "> 0 or null")
        nonnegative_int(self, "warmup_steps")
        positive_int(self, "grad_accum")
        require(0 <= self.min_lr_ratio <= 1, self, "min_lr_ratio", "in [0, 1]")
        require(self.weight_decay >= 0, self, "weight_decay", ">= 0")
        rate(self, "b1", "b2")
        require(self.eps > 0, self, "eps", "> 0")
        require(self.clip_norm >= 0, self, "clip_norm", ">= 0 (0 disables clipping)")
        if self.decay_steps is not None:
            positive_int(self, "decay_steps")
        one_of(self, "name", OPTIMIZERS)
        require(0 <= self.resonance_strength <= 1, self, "resonance_strength", "in [0, 1]")
        nonnegative_int(self, "resonance_warmup")


def lr_schedule(cfg: OptimConfig, peak_lr: float, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``peak_lr`` over warmup_steps, then cosine to min_lr_ratio·peak_lr.

    Warmup is capped at a tenth of the run so short runs still decay.
    """
    warmup = min(cfg.warmup_steps, max(total_steps // 10, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak_lr * cfg.min_lr_ratio,
    )


def decays(name: str) -> bool:
    """Whether a parameter named ``name`` (its leaf key) gets weight decay.

    Matrices (``kernel*``, ``*_kernel_*``) and lookup tables (``embedding*``, ``*_table``)
    decay; biases, norm gains, layer/memory scales, SSM damping and rotation parameters
    (``skew``, ``interference_phases_*``), gates and window weights do not.
    """
    return (
        name.startswith(("kernel", "embedding"))
        or "_kernel" in name
        or name.endswith(("_table", "_embedding"))
    )


def decay_mask(params: Any) -> Any:
    """A pytree of bools matching ``params``: True where weight decay applies."""

    def leaf_name(path: tuple) -> str:
        last = path[-1]
        return str(getattr(last, "key", getattr(last, "name", last)))

    return jax.tree_util.tree_map_with_path(lambda p, _: decays(leaf_name(p)), params)


def make_optimizer(
    cfg: OptimConfig,
    peak_lr: float,
    total_steps: int,
    trainable: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The chained optimizer (clip -> AdamW or RGD with masked decay) and its LR schedule.

    trainable: params -> bool pytree (a family's frozen-parameter rule, e.g. LoRA-only
    fine-tuning). Frozen parameters get zero updates, no weight decay and no optimizer
    state (``optax.multi_transform`` masks them out of AdamW's moments); clipping sees only
    the trainable gradients.
    """
    schedule = lr_schedule(cfg, peak_lr, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    if cfg.name == "rgd":
        parts[-1] = _rgd(cfg, schedule)
    tx = optax.chain(*parts)
    if trainable is not None:
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda t: "train" if t else "frozen", trainable(params)
        )
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def _rgd(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """RGD in AdamW's place: same betas, eps, masked decoupled decay and schedule."""
    return rgd(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        resonance_strength=cfg.resonance_strength,
        resonance_warmup=cfg.resonance_warmup,
        mask=decay_mask,
    )
