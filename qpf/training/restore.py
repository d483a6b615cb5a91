"""Reload a trained run for inference: module, params, config and tokenizer from RUN_DIR.

``RUN_DIR/config.json`` holds the run config with the model config already fitted to the
tokenizer (``fit_model_to_tokenizer`` runs before the trainer writes it), so the module is
rebuilt from it exactly as trained; the tokenizer is rebuilt by name and checked against it.
The checkpoint is restored into an abstract ``TrainState`` made with the run's own optimizer
(shapes only, nothing is initialised), because Orbax's ``StandardRestore`` needs the saved
tree's exact structure; only the params are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn

from qpf.config import ConfigError
from qpf.data.tokenizers import Tokenizer, get_tokenizer
from qpf.training.checkpoint import CheckpointError, RunCheckpoints
from qpf.training.config import RunConfig, fit_model_to_tokenizer, peak_lr
from qpf.training.optim import make_optimizer
from qpf.training.step import init_train_state

CHECKPOINT_CHOICES = ("latest", "best")


@dataclasses.dataclass
class LoadedRun:
    """A trained run ready for ``qpf.generation``.

    module: the Flax module; params: the variables for ``module.apply`` (``{'params': ...}``);
    config: the run config as trained; tokenizer: the run's tokenizer; step: the restored
    checkpoint's optimizer step; run_dir: where it came from.
    """

    module: nn.Module
    params: Any
    config: RunConfig
    tokenizer: Tokenizer
    step: int
    run_dir: Path


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """``RUN_DIR/config.json`` as a ``RunConfig``; clear errors for a missing run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: {run_dir} is not a training run directory "
            f"(train first: python -m experiments.train --run-dir {run_dir})"
        )
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        why = f"{type(err).__name__}: {err}"
        raise ConfigError(f"{path} is not a valid run config ({why})") from err


def run_tokenizer(run: RunConfig, data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The run's tokenizer, rebuilt by name (``data_dir`` overrides the run's, for GPT-2)."""
    if run.data.tokenizer == "morphological":
        # Its vocabularies are learned from the corpus and not saved in the run directory,
        # and morphological input (root/prefix/suffix triples) has no sampler anyway.
        raise ConfigError(
            "runs trained with the morphological tokenizer cannot be loaded for generation: "
            "its vocabularies are learned from the corpus and are not saved in the run "
            "directory, and morphological input has no sampler; train with --tokenizer byte "
            "or gpt2 to generate"
        )
    where = data_dir or run.data.data_dir or os.environ.get("QPF_DATA_DIR")
    return get_tokenizer(run.data.tokenizer, data_dir=where, **dict(run.data.tokenizer_options))


def _example_input(run: RunConfig) -> jax.ShapeDtypeStruct:
    # Parameter shapes do not depend on the sequence length; one short row is enough.
    return jax.ShapeDtypeStruct((1, min(run.data.seq_len, 8)), jax.numpy.int32)


def load_run(
    run_dir: str | os.PathLike,
    which: str = "latest",
    data_dir: str | os.PathLike | None = None,
) -> LoadedRun:
    """Load the ``which`` ('latest' or 'best') checkpoint of a training run.

    Raises ``ConfigError`` for a missing or foreign run directory, a bad ``which`` or an
    unloadable tokenizer, and ``CheckpointError`` when no checkpoint can be restored.
    Damaged checkpoints are skipped with a warning (the next older one is used).
    """
    if which not in CHECKPOINT_CHOICES:
        raise ConfigError(
            f"checkpoint {which!r} is invalid: allowed {', '.join(CHECKPOINT_CHOICES)}"
        )
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    tokenizer = run_tokenizer(run, data_dir)
    model_config = fit_model_to_tokenizer(run.model_config, tokenizer)
    if model_config != run.model_config:
        raise ConfigError(
            f"the tokenizer {tokenizer.name!r} (vocabulary {tokenizer.vocab_size}) does not "
            f"match the model saved in {run_dir} (vocabulary {run.model_config.vocab_size})"
        )
    module = run.family.build(model_config)

    sub = "checkpoints" if which == "latest" else "best"
    if not (run_dir / sub).is_dir() or not any((run_dir / sub).iterdir()):
        raise CheckpointError(_no_checkpoint(run_dir, which))
    tx, _ = make_optimizer(run.optim, peak_lr(run), run.train.steps)
    example = _example_input(run)
    abstract = jax.eval_shape(
        lambda x: init_train_state(module, tx, run.train.seed, x, run.train.metrics),
        example,
    )
    # Restore onto this host's first device, whatever sharding the run was trained with.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract
    )
    checkpoints = RunCheckpoints(run_dir)
    try:
        restored = checkpoints.restore_latest(
            abstract, which="last" if which == "latest" else "best"
        )
    finally:
        checkpoints.close()
    if restored is None:
        raise CheckpointError(_no_checkpoint(run_dir, which))
    step, state, _meta = restored
    return LoadedRun(module, {"params": state.params}, run, tokenizer, int(step), run_dir)


def _no_checkpoint(run_dir: Path, which: str) -> str:
    if which == "best":
        return (
            f"no usable 'best' checkpoint in {run_dir}/best (it is written at evaluations; "
            "use --checkpoint latest, or train with evaluation: python -m experiments.train "
            f"--run-dir {run_dir})"
        )
    return (
        f"no usable checkpoint in {run_dir}/checkpoints "
        f"(train first: python -m experiments.train --run-dir {run_dir})"
    )
