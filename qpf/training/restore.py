"""Reload a trained run for inference: module, params, config and tokenizer from RUN_DIR.

``RUN_DIR/config.json`` holds the run config with the model config already fitted to the
tokenizer (``fit_model_to_tokenizer`` runs before the trainer writes it), so the module is
rebuilt from it exactly as trained; the tokenizer is rebuilt by name and checked against it.
Only the ``params`` subtree of the checkpoint is read (Orbax partial restore into the
module's abstract parameters: shapes only, nothing initialised); the optimizer state stays
on disk. Nothing in the run directory is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn

from qpf.config import ConfigError
from qpf.data.tokenizers import Tokenizer, get_tokenizer
from qpf.training.checkpoint import CheckpointError, RunCheckpoints
from qpf.training.config import RunConfig, fit_model_to_tokenizer

CHECKPOINT_CHOICES = ("latest", "best")

log = logging.getLogger(__name__)


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


def read_run_config(run_dir: str | os.PathLike, recover: bool = True) -> RunConfig:
    """``RUN_DIR/config.json`` as a ``RunConfig``, with a one-line error for every fault.

    A missing ``config.json`` is recovered (read-only) from the newest checkpoint's meta
    when ``recover`` is set, with a warning; a malformed or incomplete one is an error that
    names the file and how to get it back.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        found = recovered_config(run_dir) if recover else None
        if found is None:
            raise ConfigError(
                f"{path} not found and no readable checkpoint holds the run config: "
                f"{run_dir} is not a training run directory "
                f"(train first: python -m experiments.train --run-dir {run_dir})"
            )
        step, run = found
        log.warning("%s is missing: using the run config saved in checkpoint step %d", path, step)
        return run
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); {_FIX_CONFIG}") from err
    try:
        return RunConfig.from_dict(data)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} is not a valid run config ({err}); {_FIX_CONFIG}") from err


_FIX_CONFIG = (
    "move it away (e.g. to config.json.bad): --resume and generate then use the config "
    "saved in the newest checkpoint, and --resume writes it back"
)


def recovered_config(run_dir: str | os.PathLike) -> tuple[int, RunConfig] | None:
    """(step, config) from the newest checkpoint (``checkpoints/``, else ``best/``) whose
    meta holds a valid run config; None when there is none. Writes nothing."""
    run_dir = Path(run_dir)
    if not any((run_dir / sub).is_dir() for sub in ("checkpoints", "best")):
        return None
    checkpoints = RunCheckpoints(run_dir, read_only=True)
    try:
        for which in ("last", "best"):
            for step in checkpoints.steps(which):
                try:
                    return step, RunConfig.from_dict(checkpoints.read_meta(step, which)["config"])
                except Exception as err:  # unreadable or foreign: try the next older
                    log.warning("checkpoint %s step %d holds no run config (%s)", which, step, err)
    finally:
        checkpoints.close()
    return None


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
    abstract = jax.eval_shape(
        lambda x: module.init(jax.random.key(run.train.seed), x)["params"], _example_input(run)
    )
    # Restore onto this host's first device, whatever sharding the run was trained with.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract
    )
    checkpoints = RunCheckpoints(run_dir, read_only=True)
    try:
        restored = checkpoints.restore_params(
            abstract, which="last" if which == "latest" else "best"
        )
    finally:
        checkpoints.close()
    if restored is None:
        raise CheckpointError(_no_checkpoint(run_dir, which))
    step, params = restored
    return LoadedRun(module, {"params": params}, run, tokenizer, int(step), run_dir)


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
