"""The training loop: data -> jitted step -> metrics, evaluation, samples and checkpoints.

The loop never waits on the device inside a step: it dispatches step t, then fetches step
t-1's metrics (already finished), as nanodo does. Checkpoints hold params, optimizer
state, step and the data iterator's position, so a resumed run reproduces the losses of an
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf.config import ConfigError
from qpf.data import build_datasets
from qpf.training import distributed as dist
from qpf.training.checkpoint import RunCheckpoints, abstract_like
from qpf.training.config import RunConfig
from qpf.training.metrics import MetricsLogger
from qpf.training.optim import make_optimizer
from qpf.training.step import TrainState, init_train_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf under nan_policy='stop'."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports. ``losses`` holds (step, train loss) of this process."""

    run_dir: Path
    step: int
    losses: list[tuple[int, float]]
    val: dict[str, float]
    params: Any


def fit_model_to_tokenizer(model_config: Any, tokenizer: Any) -> Any:
    """The model config with its vocabulary (and input mode) set by the tokenizer.

    A morphological tokenizer switches a qpf model to morphological input with the
    tokenizer's root/prefix/suffix vocabulary sizes; other tokenizers set ``vocab_size``.
    """
    changes: dict[str, Any] = {"vocab_size": tokenizer.vocab_size}
    if hasattr(tokenizer, "prefix_vocab_size"):
        if not hasattr(model_config, "morphology"):
            raise ConfigError(
                "the morphological tokenizer needs a qpf model (morphological input mode); "
                "use --tokenizer byte or gpt2 for baselines"
            )
        changes["input_mode"] = "morphological"
        changes["morphology"] = dataclasses.replace(
            model_config.morphology,
            root_vocab_size=tokenizer.vocab_size,
            prefix_vocab_size=tokenizer.prefix_vocab_size,
            suffix_vocab_size=tokenizer.suffix_vocab_size,
        )
    elif getattr(model_config, "input_mode", "token") == "byte_patch" and (
        tokenizer.vocab_size != 259
    ):
        raise ConfigError(
            "byte-patch presets (*-byte) read UTF-8 bytes: use --tokenizer byte "
            f"(got a tokenizer with vocabulary {tokenizer.vocab_size})"
        )
    return dataclasses.replace(model_config, **changes)


def peak_lr(run: RunConfig) -> float:
    return (
        run.optim.lr
        if run.optim.lr is not None
        else run.family.preset(run.model.rpartition(":")[2]).learning_rate
    )


class Trainer:
    """Builds everything a run needs; ``run()`` trains. One instance per process."""

    def __init__(
        self,
        run: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        sample_fn: Callable[[Any, Any], str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = jax.process_index() == 0
        self.datasets = build_datasets(run.data, jax.process_index(), jax.process_count())
        self.tokenizer = self.datasets.tokenizer
        run = dataclasses.replace(
            run, model_config=fit_model_to_tokenizer(run.model_config, self.tokenizer)
        )
        if run.optim.decay_steps is None:  # fix the schedule's horizon at the run's start
            run = dataclasses.replace(
                run, optim=dataclasses.replace(run.optim, decay_steps=run.train.steps)
            )
        self.config = run
        self.family = run.family
        self.module = self.family.build(run.model_config)
        self.mesh = dist.make_mesh(run.train.data_parallel)
        dist.check_batch_divisible(run.data.batch_size, self.mesh, run.optim.grad_accum)
        trainable = self.family.trainable and self.family.trainable(run.model_config)
        self.tx, self.schedule = make_optimizer(
            run.optim, peak_lr(run), run.optim.decay_steps, trainable
        )
        self.sample_fn = sample_fn
        self._build_steps()
        self.checkpoints = RunCheckpoints(self.run_dir, run.train.keep_checkpoints)
        self.state, self.start_step = self._initial_state(resume)
        self.logger = MetricsLogger(self.run_dir, run.train.tensorboard) if self.is_main else None
        if self.is_main:
            (self.run_dir / "config.json").write_text(run.to_json() + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ construction

    def _example_batch(self) -> jax.Array:
        shape = (1, self.config.data.seq_len)
        if self.config.data.tokenizer == "morphological":
            shape = (*shape, 3)
        return jnp.zeros(shape, jnp.int32)

    def _build_steps(self) -> None:
        repl, rows = dist.replicated(self.mesh), dist.batch_sharding(self.mesh)
        run = self.config
        self._init = jax.jit(
            lambda: init_train_state(self.module, self.tx, run.train.seed, self._example_batch()),
            out_shardings=repl,
        )
        step = make_train_step(
            self.module, self.tx, run.loss, seed=run.train.seed, grad_accum=run.optim.grad_accum
        )
        self._step = jax.jit(
            step, in_shardings=(repl, rows), out_shardings=(repl, repl), donate_argnums=0
        )
        self._eval = jax.jit(
            make_eval_step(self.module, run.loss), in_shardings=(repl, rows), out_shardings=repl
        )

    def _initial_state(self, resume: bool) -> tuple[TrainState, int]:
        state = self._init()
        if not resume:
            if self.checkpoints.latest_meta() is not None:
                raise ConfigError(
                    f"{self.run_dir} already holds checkpoints: pass --resume to continue that "
                    "run, or choose a new --run-dir"
                )
            return state, 0
        restored = self.checkpoints.restore_latest(abstract_like(state), self.datasets.train)
        if restored is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", self.run_dir)
            return state, 0
        step, state, meta = restored
        saved = RunConfig.from_dict(meta["config"])
        if saved.model_config != self.config.model_config or saved.model != self.config.model:
            raise ConfigError(
                f"--resume: the checkpoint in {self.run_dir} was trained with model "
                f"{saved.model} and a different model config; resume without changing the model"
            )
        log.info("resumed from step %d", step)
        return state, int(step)

    # ---------------------------------------------------------------------- running

    def _meta(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.name,
            "step": step,
            "metrics": metrics,
        }

    def evaluate(self, params: Any) -> dict[str, float]:
        """Token-weighted validation CE, perplexity and bits per byte over the eval split."""
        sums = {"ce_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        limit = self.config.train.eval_batches
        for i, batch in enumerate(self.datasets.eval_batches()):
            if limit and i >= limit:
                break
            out = dist.to_host(self._eval(params, dist.global_batch(batch, self.mesh)))
            for k in sums:
                sums[k] += float(out[k])
        if sums["tokens"] == 0:
            raise ValueError("the validation split produced no target tokens")
        loss = sums["ce_sum"] / sums["tokens"]
        return {
            "val/loss": loss,
            "val/ppl": math.exp(min(loss, 700.0)),
            "val/bpb": sums["ce_sum"] / math.log(2) / max(sums["bytes"], 1.0),
            "val/tokens": sums["tokens"],
        }

    def save(self, step: int, val: dict[str, float] | None) -> None:
        meta = self._meta(step, val or {})
        self.checkpoints.save(step, self.state, self.datasets.train, meta)
        if val is not None:
            self.checkpoints.save_if_best(
                step, val["val/loss"], self.state, self.datasets.train, meta
            )

    def run(self) -> TrainResult:
        """Train from ``start_step`` to ``train.steps``; returns losses and final metrics."""
        cfg = self.config.train
        bar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start_step, unit="step", dynamic_ncols=True)
        losses: list[tuple[int, float]] = []
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        pending: tuple[int, Any] | None = None
        profile = cfg.profile_range()
        val: dict[str, float] = {}

        def flush() -> None:
            nonlocal pending, window_start
            if pending is None:
                return
            step, metrics = pending
            pending = None
            m = {k: float(v) for k, v in dist.to_host(metrics).items()}
            if m["nonfinite"]:
                if cfg.nan_policy == "stop":
                    raise TrainingDiverged(
                        f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at "
                        f"step {step}: stopping (the last good checkpoint in {self.run_dir} is "
                        "kept; lower --lr, or set train.nan_policy=skip to drop such steps)"
                    )
                log.warning("step %d: non-finite loss, update skipped", step)
            losses.append((step, m["loss"]))
            window.append(m)
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                tok_s = sum(w["tokens"] for w in window) / max(elapsed, 1e-9)
                record = {
                    f"train/{k}": float(np.mean([w[k] for w in window]))
                    for k in m
                    if k not in ("tokens", "nonfinite")
                }
                record["train/lr"] = float(self.schedule(step - 1))
                record["train/tokens_per_s"] = tok_s
                record["train/skipped"] = sum(w["nonfinite"] for w in window)
                if self.logger:
                    self.logger.log(step, record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train/loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                window.clear()
                window_start = time.perf_counter()

        for step in range(self.start_step + 1, cfg.steps + 1):
            if profile and step - 1 == profile[0]:
                jax.profiler.start_trace(str(self.run_dir / "profile"), create_perfetto_trace=True)
            batch = dist.global_batch(next(self.datasets.train), self.mesh)
            self.state, metrics = self._step(self.state, batch)
            flush()
            pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            if profile and step == profile[1]:
                jax.block_until_ready(self.state)
                jax.profiler.stop_trace()
            last = step == cfg.steps
            do_eval = last or (cfg.eval_every and step % cfg.eval_every == 0)
            do_save = last or (cfg.save_every and step % cfg.save_every == 0)
            if do_eval or do_save:
                flush()
            if do_eval:
                val = self.evaluate(self.state.params)
                if self.logger:
                    self.logger.log(step, val)
                self._print_eval(step, val)
            if do_save:
                self.save(step, val if do_eval else None)
        flush()
        if bar is not None:
            bar.close()
        if not val and self.start_step >= cfg.steps:
            val = self.evaluate(self.state.params)
        return TrainResult(self.run_dir, cfg.steps, losses, val, self.state.params)

    def _print_eval(self, step: int, val: dict[str, float]) -> None:
        # Every process samples (the params are global arrays); only process 0 prints.
        text = None
        if self.sample_fn is not None and self.config.train.sample_tokens:
            text = self.sample_fn(self, self.state.params)
        if not self.is_main:
            return
        print(
            f"step {step}: val loss {val['val/loss']:.4f}  ppl {val['val/ppl']:.2f}  "
            f"bpb {val['val/bpb']:.4f}",
            flush=True,
        )
        if text is not None:
            print(f"--- sample ---\n{text}\n--------------", flush=True)
            if self.logger:
                self.logger.text(step, "sample", text)

    def close(self) -> None:
        self.checkpoints.close()
        if self.logger:
            self.logger.close()
