"""The training loop: data -> jitted step -> metrics, evaluation, samples and checkpoints.

The loop never waits on the device inside a step: it dispatches step t, then fetches step
t-1's metrics (already finished), as nanodo does. Checkpoints hold params, optimizer
state, step and the data iterator's position, so a resumed run reproduces the losses of an
uninterrupted one exactly. The run directory is locked for the life of the trainer.
Throughput and the ETA count train-step time only; evaluation time is logged separately
(``val/time_s``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf.config import ConfigError
from qpf.data import build_datasets
from qpf.diagnostics.tensorboard import PROBE_ROWS, make_probe, model_diagnostics
from qpf.training import distributed as dist
from qpf.training.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from qpf.training.config import RunConfig, fit_model_to_tokenizer, peak_lr, resume_differences
from qpf.training.metrics import MetricsLogger
from qpf.training.optim import make_optimizer
from qpf.training.runlock import RunLock
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


@dataclasses.dataclass
class _Loop:
    """Mutable state of one ``Trainer.run``.

    window: host metrics of the train steps since the last log record. train_time: seconds
    spent in train steps (dispatch and metric fetch) in that window, excluding evaluation,
    sampling and saving, so tokens/s and the ETA describe training alone.
    """

    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    window: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)
    pending: tuple[int, Any] | None = None
    val: dict[str, float] = dataclasses.field(default_factory=dict)
    train_time: float = 0.0
    total_train_time: float = 0.0
    steps_timed: int = 0
    first_step: int | None = None  # its time is compilation, not training
    bar: Any = None


class Trainer:
    """Builds everything a run needs; ``run()`` trains. One instance per process.

    The run directory is locked (``RUN_DIR/.lock``) from construction to ``close()``.
    ``resume=True`` continues the newest readable checkpoint and refuses, before anything
    is compiled or written, a config that changes the model or the data stream.
    """

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
        self.sample_fn = sample_fn
        self._probe: Any = None  # jitted diagnostics forward, built on first use
        self.checkpoints: RunCheckpoints | None = None
        self.logger: MetricsLogger | None = None
        self.datasets = build_datasets(run.data, jax.process_index(), jax.process_count())
        self.tokenizer = self.datasets.tokenizer
        self.config = self._fitted_config(run)
        self.lock = RunLock(self.run_dir) if self.is_main else None
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction

    def _fitted_config(self, run: RunConfig) -> RunConfig:
        run = dataclasses.replace(
            run, model_config=fit_model_to_tokenizer(run.model_config, self.tokenizer)
        )
        if run.optim.decay_steps is None:  # fix the schedule's horizon at the run's start
            run = dataclasses.replace(
                run, optim=dataclasses.replace(run.optim, decay_steps=run.train.steps)
            )
        return run

    def _setup(self, resume: bool) -> None:
        run = self.config
        self.checkpoints = RunCheckpoints(self.run_dir, run.train.keep_checkpoints)
        self._check_run_dir(resume)
        self.family = run.family
        self.module = self.family.build(run.model_config)
        self.mesh = dist.make_mesh(run.train.data_parallel)
        dist.check_batch_divisible(run.data.batch_size, self.mesh, run.optim.grad_accum)
        trainable = self.family.trainable and self.family.trainable(run.model_config)
        self.tx, self.schedule = make_optimizer(
            run.optim, peak_lr(run), run.optim.decay_steps, trainable
        )
        self._build_steps()
        self.state, self.start_step = self._initial_state(resume)
        if self.is_main:
            self._write_config()
            self.logger = MetricsLogger(
                self.run_dir, run.train.tensorboard, keep_until=self.start_step
            )

    def _check_run_dir(self, resume: bool) -> None:
        """A fresh run needs an unused directory; a resumed one a readable, same-config run."""
        if not resume:
            used = [n for n in ("config.json", "metrics.jsonl") if (self.run_dir / n).exists()]
            if self.checkpoints.steps("last") or used:
                raise ConfigError(
                    f"{self.run_dir} already holds a training run: pass --resume to continue "
                    "it, or choose a new --run-dir"
                )
            return
        found = self.checkpoints.latest_meta()
        if found is None:
            raise CheckpointError(self._nothing_to_resume())
        self._check_same_run(*found)

    def _nothing_to_resume(self) -> str:
        bad = sorted(self.checkpoints.damaged["last"])
        why = f"steps {bad} are unreadable" if bad else "it holds none"
        return (
            f"--resume: no readable checkpoint in {self.run_dir / 'checkpoints'} ({why}); "
            f"to start over, remove {self.run_dir} or choose a new --run-dir"
        )

    def _check_same_run(self, step: int, meta: dict) -> None:
        """Refuse to resume checkpoint ``step`` with a different model or data stream."""
        try:
            saved = RunConfig.from_dict(meta["config"])
        except (ConfigError, KeyError, TypeError) as err:
            raise ConfigError(
                f"--resume: checkpoint step {step} in {self.run_dir} holds no usable run "
                f"config ({err}); start a new run with a new --run-dir"
            ) from err
        diff = resume_differences(saved, self.config)
        if diff:
            raise ConfigError(
                f"--resume: {self.run_dir} was trained with a different configuration "
                f"({'; '.join(diff)}). These change the model or the data stream, so its "
                "checkpoints cannot continue: resume without those options, or start a new "
                "run with them in a new --run-dir"
            )

    def _example_batch(self) -> jax.Array:
        shape = (1, self.config.data.seq_len)
        if self.config.data.tokenizer == "morphological":
            shape = (*shape, 3)
        return jnp.zeros(shape, jnp.int32)

    def _build_steps(self) -> None:
        repl, rows = dist.replicated(self.mesh), dist.batch_sharding(self.mesh)
        run = self.config
        self._init = jax.jit(
            lambda: init_train_state(
                self.module, self.tx, run.train.seed, self._example_batch(), run.train.metrics
            ),
            out_shardings=repl,
        )
        step = make_train_step(
            self.module,
            self.tx,
            run.loss,
            seed=run.train.seed,
            grad_accum=run.optim.grad_accum,
            insight=run.train.metrics,
        )
        # Traced under the mesh so kernels without a partitioning rule (the Pallas scan) run
        # in shard_map over the data axis; init sees no mesh (its example batch is one row).
        self._step = jax.jit(
            dist.under_mesh(step, self.mesh),
            in_shardings=(repl, rows),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            dist.under_mesh(make_eval_step(self.module, run.loss), self.mesh),
            in_shardings=(repl, rows),
            out_shardings=repl,
        )

    def _initial_state(self, resume: bool) -> tuple[TrainState, int]:
        state = self._init()
        if not resume:
            return state, 0
        restored = self.checkpoints.restore_latest(
            abstract_like(state), self.datasets.train, check=self._check_same_run
        )
        if restored is None:
            raise CheckpointError(self._nothing_to_resume())
        step, state, _meta = restored
        log.info("resumed from step %d of %s", step, self.run_dir)
        return state, int(step)

    def _write_config(self) -> None:
        # Atomic: a crash mid-write never leaves a truncated config.json.
        path = self.run_dir / "config.json"
        tmp = path.with_name(f".config.json.tmp{os.getpid()}")
        tmp.write_text(self.config.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)

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
            self.checkpoints.save_best(step, val["val/loss"], self.state, self.datasets.train, meta)

    def run(self) -> TrainResult:
        """Train from ``start_step`` to ``train.steps``; returns losses and final metrics."""
        cfg = self.config.train
        loop = _Loop(bar=self._open_bar())
        profile = cfg.profile_range()
        try:
            for step in range(self.start_step + 1, cfg.steps + 1):
                self._profile(profile, step, before=True)
                self._train_step(loop, step)
                self._profile(profile, step, before=False)
                self._evaluate_and_save(loop, step)
            self._record(loop)
        finally:
            if loop.bar is not None:
                loop.bar.close()
        if not loop.val and self.start_step >= cfg.steps:
            loop.val = self.evaluate(self.state.params)
        return TrainResult(self.run_dir, cfg.steps, loop.losses, loop.val, self.state.params)

    def _open_bar(self) -> Any:
        if not (self.is_main and self.config.train.progress):
            return None
        from tqdm import tqdm

        total, start = self.config.train.steps, self.start_step
        return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def _profile(self, profile: tuple[int, int] | None, step: int, before: bool) -> None:
        """Trace steps A..B-1 (0-based) of ``profile`` = (A, B)."""
        if profile and before and step - 1 == profile[0]:
            jax.profiler.start_trace(str(self.run_dir / "profile"), create_perfetto_trace=True)
        if profile and not before and step == profile[1]:
            jax.block_until_ready(self.state)
            jax.profiler.stop_trace()

    def _train_step(self, loop: _Loop, step: int) -> None:
        """Dispatch ``step``, then record step-1 (finished by now): no wait on the device."""
        t0 = time.perf_counter()
        batch = dist.global_batch(next(self.datasets.train), self.mesh)
        self.state, metrics = self._step(self.state, batch)
        self._record(loop)
        loop.pending = (step, metrics)
        if loop.first_step is None:
            loop.first_step = step
            log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
        else:
            loop.train_time += time.perf_counter() - t0
        if loop.bar is not None:
            loop.bar.update(1)
        every = self.config.train.diagnostics_every
        if every and step % every == 0:
            self._log_diagnostics(step, batch)

    def _record(self, loop: _Loop) -> None:
        """Fetch the pending step's metrics; write a log record every ``log_every`` steps."""
        if loop.pending is None:
            return
        cfg = self.config.train
        t0 = time.perf_counter()
        step, metrics = loop.pending
        loop.pending = None
        m = {k: float(v) for k, v in dist.to_host(metrics).items()}
        loop.train_time += time.perf_counter() - t0
        if m["nonfinite"]:
            if cfg.nan_policy == "stop":
                raise TrainingDiverged(
                    f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at "
                    f"step {step}: stopping (the last good checkpoint in {self.run_dir} is "
                    "kept; lower --lr, or set train.nan_policy=skip to drop such steps)"
                )
            log.warning("step %d: non-finite loss, update skipped", step)
        loop.losses.append((step, m["loss"]))
        loop.window.append((step, m))
        if step % cfg.log_every == 0 or step == cfg.steps:
            self._log_window(loop, step)

    def _log_window(self, loop: _Loop, step: int) -> None:
        timed = [m for s, m in loop.window if s != loop.first_step]
        window = [m for _, m in loop.window]
        tok_s = sum(w["tokens"] for w in timed) / max(loop.train_time, 1e-9)
        record = {
            f"train/{k}": float(np.mean([w[k] for w in window]))
            for k in window[-1]
            if k not in ("tokens", "nonfinite")
        }
        record["train/lr"] = float(self.schedule(step - 1))
        if timed:  # a window holding only the compiling first step has no throughput
            record["train/tokens_per_s"] = tok_s
            record["train/step_time_s"] = loop.train_time / len(timed)
        record["train/skipped"] = sum(w["nonfinite"] for w in window)
        if self.logger:
            self.logger.log(step, record)
        loop.total_train_time += loop.train_time
        loop.steps_timed += len(timed)
        if loop.bar is not None and loop.steps_timed:
            eta = (self.config.train.steps - step) * loop.total_train_time / loop.steps_timed
            loop.bar.set_postfix(
                loss=f"{record['train/loss']:.4f}", tok_s=f"{tok_s:,.0f}", eta=_clock(eta)
            )
        loop.window.clear()
        loop.train_time = 0.0

    def _evaluate_and_save(self, loop: _Loop, step: int) -> None:
        cfg = self.config.train
        last = step == cfg.steps
        do_eval = last or (cfg.eval_every and step % cfg.eval_every == 0)
        do_save = last or (cfg.save_every and step % cfg.save_every == 0)
        if not (do_eval or do_save):
            return
        self._record(loop)
        if do_eval:
            t0 = time.perf_counter()
            loop.val = self.evaluate(self.state.params)
            loop.val["val/time_s"] = time.perf_counter() - t0
            if self.logger:
                self.logger.log(step, loop.val)
            self._print_eval(step, loop.val, loop.bar)
        if do_save:
            self.save(step, loop.val if do_eval else None)
        if loop.bar is not None:
            loop.bar.unpause()  # tqdm's rate and ETA: train steps only

    def _log_diagnostics(self, step: int, batch: dict[str, Any]) -> None:
        """Spectrum, routing and slot-usage diagnostics into TensorBoard (process 0)."""
        if self.logger is None:
            return
        if self._probe is None:
            self._probe = make_probe(self.module)
        family = self.config.model.rpartition(":")[0] or "qpf"
        tokens = batch["tokens"][:PROBE_ROWS]
        probe = self._probe(self.state.params, tokens) if tokens.ndim == 2 else None
        scalars, hists = model_diagnostics(family, self.module, self.state.params, probe)
        if scalars:
            self.logger.log(step, {f"diag/{k}": v for k, v in scalars.items()})
        for tag, values in hists.items():
            if len(values):
                self.logger.histogram(step, f"diag/{tag}", values)

    def _print_eval(self, step: int, val: dict[str, float], bar: Any) -> None:
        # Every process samples (the params are global arrays); only process 0 prints.
        text = None
        if self.sample_fn is not None and self.config.train.sample_tokens:
            text = self.sample_fn(self, self.state.params)
        if not self.is_main:
            return
        echo = _echo(bar)
        echo(
            f"step {step}: val loss {val['val/loss']:.4f}  ppl {val['val/ppl']:.2f}  "
            f"bpb {val['val/bpb']:.4f}  (eval {val['val/time_s']:.1f} s)"
        )
        if text is not None:
            echo(f"--- sample ---\n{text}\n--------------")
            if self.logger:
                self.logger.text(step, "sample", text)

    def close(self) -> None:
        """Finish pending writes and release the run directory (safe to call twice)."""
        try:
            if self.checkpoints is not None:
                self.checkpoints.close()
                self.checkpoints = None
            if self.logger:
                self.logger.close()
                self.logger = None
        finally:
            if self.lock is not None:
                self.lock.release()


def _echo(bar: Any) -> Callable[[str], None]:
    """Print above the progress bar (tqdm.write) when there is one."""
    if bar is None:
        return lambda text: print(text, flush=True)
    from tqdm import tqdm

    return lambda text: tqdm.write(text)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
