"""Orbax checkpoints of a training run: the last N steps plus the best by validation loss.

A checkpoint holds the ``TrainState`` (params, optimizer state, step), the data iterator's
state (one file per process), and a JSON ``meta`` item (run config, tokenizer name,
metrics). Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never touches the previous checkpoint; a step whose files
are damaged anyway is skipped on restore with a warning and the next older one is used.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def _manager(directory: Path, max_to_keep: int, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        best_fn=(lambda m: m["val_loss"]) if best else None,
        best_mode="min",
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding structs of ``tree`` (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
    """``RUN_DIR/checkpoints`` (last ``keep`` steps) and ``RUN_DIR/best`` (one, min val loss)."""

    def __init__(self, run_dir: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoints, got {keep}")
        self.last = _manager(Path(run_dir) / "checkpoints", keep, best=False)
        self.best = _manager(Path(run_dir) / "best", 1, best=True)
        self.best_loss = math.inf
        for step in self.best.all_steps():
            meta = self._read_meta(self.best, step)
            if meta is not None and "val_loss" in meta.get("metrics", {}):
                self.best_loss = min(self.best_loss, meta["metrics"]["val_loss"])

    @staticmethod
    def _args(state: Any, data_iter: Any, meta: dict) -> ocp.args.Composite:
        # Grain's handler writes one iterator-state file per process, so every host of a
        # multi-host run resumes its own shard of the data.
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )

    def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
        """Save ``step`` among the last N (the oldest beyond N is deleted)."""
        if step in self.last.all_steps():
            return
        self.last.save(step, args=self._args(state, data_iter, meta), force=True)
        self.last.wait_until_finished()

    def save_if_best(
        self, step: int, val_loss: float, state: Any, data_iter: Any, meta: dict
    ) -> bool:
        """Keep this step as the best if its validation loss beats every earlier one."""
        if not val_loss < self.best_loss:
            return False
        self.best_loss = val_loss
        meta = {**meta, "metrics": {**meta.get("metrics", {}), "val_loss": val_loss}}
        for old in self.best.all_steps():
            self.best.delete(old)
        self.best.save(
            step,
            args=self._args(state, data_iter, meta),
            metrics={"val_loss": val_loss},
            force=True,
        )
        self.best.wait_until_finished()
        return True

    @staticmethod
    def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return restored["meta"]
        except Exception:  # damaged or incomplete: the caller decides what to do
            return None

    def latest_meta(self, which: str = "last") -> tuple[int, dict] | None:
        """(step, meta) of the newest readable checkpoint of ``which`` ('last'/'best')."""
        manager = self.last if which == "last" else self.best
        for step in sorted(manager.all_steps(), reverse=True):
            meta = self._read_meta(manager, step)
            if meta is not None:
                return step, meta
        return None

    def restore_latest(
        self, abstract_state: Any, data_iter: Any | None = None, which: str = "last"
    ) -> tuple[int, Any, dict] | None:
        """Restore the newest complete checkpoint: (step, state, meta).

        ``data_iter`` (when given) is moved to the saved position in place. Damaged steps
        are skipped with a warning; None when there is no checkpoint at all.
        """
        manager = self.last if which == "last" else self.best
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                items = {
                    "state": ocp.args.StandardRestore(abstract_state),
                    "meta": ocp.args.JsonRestore(),
                }
                if data_iter is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
                restored = manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:
                log.warning(
                    "checkpoint step %d in %s is incomplete or damaged (%s: %s); "
                    "falling back to the previous one",
                    step,
                    manager.directory,
                    type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "",
                )
                continue
            return step, restored["state"], restored["meta"]
        return None

    def close(self) -> None:
        self.last.close()
        self.best.close()
