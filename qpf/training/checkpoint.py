"""Orbax checkpoints of a training run: the last N steps plus the best by validation loss.

A checkpoint holds the ``TrainState`` (params, optimizer state, step), the data iterator's
state (one file per process), and a JSON ``meta`` item (run config, tokenizer name,
metrics). Orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-save never touches the previous checkpoint.

Saves are asynchronous (Orbax's async checkpointing): ``save`` returns once the arrays are
copied to host memory, and the files are written in a background thread while training
goes on. Every read (``steps``, ``read_meta``, restores), the next save, and ``close``
first wait for the write in flight, so a caller never sees a half-written step; a process
that dies mid-write loses only that step.

* ``RUN_DIR/checkpoints`` keeps the last ``keep_last`` steps (``max_to_keep``).
* ``RUN_DIR/best`` is kept by Orbax's own best-checkpoint retention (``best_fn`` on the
  saved ``val_loss`` metric, ``best_mode='min'``, ``max_to_keep=1``): the new step is
  written completely before the worse one is deleted, so a crash never leaves zero best
  checkpoints.
* A step that fails to restore is skipped with a warning naming it, and the next older one
  is used. Saving that step again later replaces the damaged folder: the new copy is
  written completely beside it (``RUN_DIR/.replace``), then swapped in by renames; the
  damaged copy is kept under ``RUN_DIR/damaged/`` for inspection.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from qpf.config import ConfigError

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def _manager(
    directory: Path, max_to_keep: int, best: bool, read_only: bool = False, async_save: bool = True
):
    best_options = {}
    if best:
        best_options = {"best_fn": (lambda m: m["val_loss"]), "best_mode": "min"}
    if read_only:  # nothing may be created, saved or deleted
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0, **best_options
        )
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            **best_options,
            **({"keep_checkpoints_without_metrics": False} if best else {}),
        )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding structs of ``tree`` (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class RunCheckpoints:
    """``RUN_DIR/checkpoints`` (last ``keep_last`` steps) and ``RUN_DIR/best`` (min val loss).

    read_only: open existing folders without creating or writing anything (inference).
    """

    def __init__(self, run_dir: Path, keep_last: int = 3, read_only: bool = False) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 checkpoints, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.read_only = read_only
        self.last = _manager(self.run_dir / "checkpoints", keep_last, False, read_only)
        self.best = _manager(self.run_dir / "best", 1, True, read_only)
        self.damaged: dict[str, set[int]] = {"last": set(), "best": set()}

    def _mgr(self, which: str) -> ocp.CheckpointManager:
        """The manager of ``which``, after any write in flight has finished."""
        if which not in ("last", "best"):
            raise ValueError(f"which = {which!r} is invalid: allowed 'last', 'best'")
        manager = self.last if which == "last" else self.best
        manager.wait_until_finished()
        return manager

    def wait(self) -> None:
        """Block until every asynchronous save has been written."""
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    @staticmethod
    def _args(state: Any, data_iter: Any, meta: dict) -> ocp.args.Composite:
        # Grain's handler writes one iterator-state file per process, so every host of a
        # multi-host run resumes its own shard of the data.
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )

    # ------------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        """Save ``step`` among the last N (the oldest beyond N is deleted)."""
        self._save("last", step, self._args(state, data_iter, meta), None)

    def save_best(self, step: int, val_loss: float, state: Any, data_iter: Any, meta: dict) -> None:
        """Offer ``step`` to the best folder; Orbax keeps the one with the lowest val loss."""
        meta = {**meta, "metrics": {**meta.get("metrics", {}), "val_loss": val_loss}}
        metrics = {"val_loss": float(val_loss)}
        self._save("best", step, self._args(state, data_iter, meta), metrics)

    def _save(self, which: str, step: int, args: Any, metrics: dict | None) -> None:
        manager = self._mgr(which)
        if step in manager.all_steps():
            self._replace(which, step, args, metrics)
            return
        manager.save(step, args=args, metrics=metrics, force=True)  # returns before the write

    def _replace(self, which: str, step: int, args: Any, metrics: dict | None) -> None:
        """Write ``step`` completely into a staging folder, then swap it in by renames.

        Only reached for a step folder left over from before a resume: after an exact
        resume the same step can only exist if it failed to restore (it would have been
        resumed from otherwise). The old copy is moved to ``RUN_DIR/damaged/``.
        """
        manager = self._mgr(which)
        sub = Path(manager.directory).name
        staging = self.run_dir / ".replace" / sub
        shutil.rmtree(staging, ignore_errors=True)
        stager = _manager(staging, 1, which == "best", async_save=False)
        try:
            stager.save(step, args=args, metrics=metrics, force=True)
            stager.wait_until_finished()
        finally:
            stager.close()
        target = Path(manager.directory) / str(step)
        aside = self.run_dir / "damaged" / f"{sub}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(target, aside)
        os.replace(staging / str(step), target)
        shutil.rmtree(staging.parent, ignore_errors=True)
        manager.reload()
        self.damaged[which].discard(step)
        log.warning(
            "replaced checkpoint step %d in %s (the old copy is kept in %s)",
            step,
            manager.directory,
            aside,
        )

    # ----------------------------------------------------------------------- reading

    def steps(self, which: str = "last") -> list[int]:
        """Saved steps of ``which`` ('last'/'best'), newest first."""
        return sorted(self._mgr(which).all_steps(), reverse=True)

    def read_meta(self, step: int, which: str = "last") -> dict:
        """The JSON meta item of one step (raises when it is unreadable)."""
        restored = self._mgr(which).restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return restored["meta"]

    def latest_meta(self, which: str = "last") -> tuple[int, dict] | None:
        """(step, meta) of the newest step whose meta is readable; None when there is none."""
        for step in self.steps(which):
            try:
                return step, self.read_meta(step, which)
            except Exception as err:  # damaged or incomplete: try the next older
                self._warn_damaged(which, step, err)
        return None

    def _warn_damaged(self, which: str, step: int, err: BaseException) -> None:
        if step in self.damaged[which]:
            return
        self.damaged[which].add(step)
        log.warning(
            "checkpoint step %d in %s is unreadable (%s); falling back to the previous one",
            step,
            self._mgr(which).directory,
            _first_line(err),
        )

    def restore_latest(
        self,
        abstract_state: Any,
        data_iter: Any | None = None,
        which: str = "last",
        check: Callable[[int, dict], None] | None = None,
    ) -> tuple[int, Any, dict] | None:
        """Restore the newest readable checkpoint: (step, state, meta).

        ``data_iter`` (when given) is moved to the saved position in place. ``check(step,
        meta)`` runs before the state is read and may raise ``ConfigError`` (a run that must
        not be resumed: propagated, never treated as damage). Unreadable steps are skipped
        with a warning each; None when no step is readable.
        """
        for step in self.steps(which):
            try:
                meta = self.read_meta(step, which)
            except Exception as err:
                self._warn_damaged(which, step, err)
                continue
            if check is not None:
                check(step, meta)
            try:
                state, _ = self._restore_state(which, step, abstract_state, data_iter)
            except ConfigError:
                raise
            except Exception as err:
                self._warn_damaged(which, step, err)
                continue
            return step, state, meta
        return None

    def _restore_state(
        self, which: str, step: int, abstract_state: Any, data_iter: Any | None
    ) -> tuple[Any, Any]:
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._mgr(which).restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored.get("data") if data_iter is not None else None

    def restore_params(self, abstract_params: Any, which: str = "last") -> tuple[int, Any] | None:
        """Only the ``params`` subtree of the newest readable step: (step, params).

        For inference: the optimizer state is never read (Orbax partial restore), so it
        costs neither time nor memory. Unreadable steps are skipped with a warning each.
        """
        target = {"params": abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        for step in self.steps(which):
            try:
                restored = self._mgr(which).restore(step, args=ocp.args.Composite(state=args))
            except Exception as err:
                self._warn_damaged(which, step, err)
                continue
            return step, restored["state"]["params"]
        return None

    def close(self) -> None:
        """Finish the writes in flight, then release the managers."""
        self.wait()
        self.last.close()
        self.best.close()
