"""Training several models on the same batches and token budget: what ``experiments.compare``
and ``experiments.ablate`` share.

* ``Schedule``: optimizer steps and evaluation cadence from a token budget;
* ``shared_sections``: the ``DataConfig`` and ``TrainConfig`` every model of a comparison gets
  (the same corpus, tokenizer, windows, order and seed: the same batches);
* ``make_run`` / ``check_shared``: one model's ``RunConfig``, refusing overrides that would
  make the data or the loop differ between models;
* ``train_one``: train (or resume) one model with the shared ``Trainer`` and return its final
  metrics, curves and timings;
* ``environment`` and ``plot_curves``: the results header and the learning-curve figure.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from qpf.config import ConfigError
from qpf.data import DataConfig
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.metrics import read_metrics
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig
from qpf.training.trainer import Trainer, peak_lr


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The shared step schedule derived from the token budget."""

    tokens_per_step: int
    steps: int
    eval_every: int

    @classmethod
    def from_budget(
        cls, tokens: int, batch_size: int, seq_len: int, eval_every_tokens: int | None = None
    ) -> Schedule:
        """``tokens // (batch_size * seq_len)`` steps; evaluation every ``eval_every_tokens``
        (default a fifth of the budget), at least once per run."""
        per_step = batch_size * seq_len
        steps = tokens // per_step
        if steps < 1:
            raise ConfigError(
                f"--tokens {tokens} is less than one step "
                f"({batch_size} x {seq_len} = {per_step} tokens)"
            )
        every_tokens = eval_every_tokens or tokens // 5
        return cls(per_step, steps, max(1, min(steps, every_tokens // per_step)))


def shared_sections(
    *,
    corpus: str,
    tokenizer: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    data_dir: str | None,
    sched: Schedule,
    eval_batches: int,
    save_every: int = 0,
    keep_checkpoints: int = 3,
) -> tuple[DataConfig, TrainConfig]:
    """The data and loop sections every model of a comparison shares.

    save_every 0 keeps only the final checkpoint (saving is not what is compared); a
    resumable harness saves periodically so an interrupted model continues where it was.
    """
    data = DataConfig(
        corpus=corpus,
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        data_dir=data_dir,
    )
    train = TrainConfig(
        steps=sched.steps,
        eval_every=sched.eval_every,
        eval_batches=eval_batches,
        save_every=save_every,
        keep_checkpoints=keep_checkpoints,
        log_every=max(1, sched.steps // 50),
        seed=seed,
        sample_tokens=0,
        tensorboard=False,
        progress=False,
    )
    return data, train


def check_shared(run: RunConfig, data: DataConfig, train: TrainConfig) -> None:
    """Refuse a run whose data or loop differs from the shared ones (the comparison's premise)."""
    for section, value in (("data", data), ("train", train)):
        if getattr(run, section) != value:
            raise ConfigError(
                f"--set {section}.*: data and train settings must be equal for all models; "
                "use --seq-len, --batch-size, --tokens, --eval-every-tokens, --dataset instead"
            )


def make_run(
    spec: str,
    model_config: Any,
    data: DataConfig,
    train: TrainConfig,
    lr: float | None,
    overrides: Mapping[str, str] | None = None,
) -> RunConfig:
    """One model's RunConfig; everything but the model (and its preset LR) is shared."""
    run = RunConfig(spec, model_config, data, OptimConfig(lr=lr), LossConfig(), train)
    if overrides:
        run = run.with_overrides(overrides)
    check_shared(run, data, train)
    return run


def _curve(records: list[dict[str, Any]], key: str, name: str, per_step: int) -> list[dict]:
    return [
        {"step": r["step"], "tokens": r["step"] * per_step, name: r[key]}
        for r in records
        if key in r
    ]


def train_one(
    spec: str, run: RunConfig, run_dir: Path, sched: Schedule, *, resume: bool = False
) -> dict[str, Any]:
    """Train one model (``resume``: continue its newest checkpoint); its metrics and timings.

    A fresh run is evaluated before its first step too (the curve starts at 0 tokens).
    ``train_s``/``wall_s`` time this call only (a resumed run: the part trained now);
    ``train_tokens_per_s`` is the median of the trainer's logged train-step throughput over
    the whole run (compilation and evaluation excluded, robust to a busy machine).
    """
    t0 = time.perf_counter()
    trainer = Trainer(run, run_dir, resume=resume)
    try:
        setup_s = time.perf_counter() - t0
        start_step = trainer.start_step
        if start_step == 0:
            initial = trainer.evaluate(trainer.state.params)
            if trainer.logger:
                trainer.logger.log(0, initial)
        t1 = time.perf_counter()
        result = trainer.run()
        train_s = time.perf_counter() - t1
    finally:
        trainer.close()
    params = sum(int(x.size) for x in jax.tree.leaves(result.params))
    records = read_metrics(run_dir)
    per_step = sched.tokens_per_step
    val_curve = _curve(records, "val/loss", "val_loss", per_step)
    train_curve = _curve(records, "train/loss", "train_loss", per_step)
    speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    trained_steps = result.step - start_step
    vocab = trainer.config.model_config.vocab_size
    initial_loss = next((p["val_loss"] for p in val_curve if p["step"] == 0), math.nan)
    return {
        "model": spec,
        "params": params,
        "vocab_size": vocab,
        "lr": peak_lr(trainer.config),
        "steps": result.step,
        "tokens": result.step * per_step,
        "val_loss": result.val["val/loss"],
        "val_ppl": result.val["val/ppl"],
        "val_bpb": result.val["val/bpb"],
        "val_bits_per_token": result.val["val/loss"] / math.log(2),
        "initial_val_loss": initial_loss,
        "ln_vocab": math.log(vocab),
        "val_curve": val_curve,
        "train_curve": train_curve,
        "setup_s": setup_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t0,
        "resumed_from_step": start_step if resume else None,
        "train_tokens_per_s": (
            statistics.median(speeds) if speeds else trained_steps * per_step / max(train_s, 1e-9)
        ),
        "run_dir": str(run_dir),
    }


def environment() -> dict[str, Any]:
    """Where and when the comparison ran (for the results header)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def plot_curves(models: Sequence[Mapping[str, Any]], path: Path, label: str = "model") -> None:
    """Validation and train loss against tokens seen, one line per model (``m[label]``)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; write files only
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        ax_val.plot(
            [p["tokens"] for p in m["val_curve"]],
            [p["val_loss"] for p in m["val_curve"]],
            marker="o",
            label=m[label],
        )
        ax_train.plot(
            [p["tokens"] for p in m["train_curve"]],
            [p["train_loss"] for p in m["train_curve"]],
            label=m[label],
        )
    for ax, title in ((ax_val, "validation loss"), (ax_train, "train loss")):
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_record(args: Any, sched: Any) -> dict[str, Any]:
    """The shared budget settings of an equal-token run, as its results JSON records them.

    args: the CLI namespace (seq_len, batch_size, eval_batches, seed, lr); sched: the step
    schedule (steps, tokens_per_step, eval_every).
    """
    return {
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": sched.steps,
        "tokens": sched.steps * sched.tokens_per_step,
        "eval_every_steps": sched.eval_every,
        "eval_batches": args.eval_batches,
        "seed": args.seed,
        "lr": args.lr,
    }
