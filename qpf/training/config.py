"""The run configuration: model (``family:preset`` + its config), data, optimizer, loss, loop.

Everything a run does is in one frozen ``RunConfig``, saved as ``RUN_DIR/config.json`` and in
every checkpoint; ``--set section.field=value`` overrides any field with validation
(``model.dim=128``, ``optim.weight_decay=0``, ``train.nan_policy=skip``, ``data.mode=pad``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from qpf import config as cfgs
from qpf.config import ConfigError, nonnegative_int, one_of, positive_int, require
from qpf.data import DataConfig
from qpf.diagnostics.in_step import INSIGHT_MODES
from qpf.models.family import ModelFamily, check_segment_resets
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig
from qpf.zoo import get_family, resolve_model

NAN_POLICIES = ("stop", "skip")
RUN_SECTIONS = ("model", "model_config", "data", "optim", "loss", "train")

# What a resumed run may not change: everything that shapes the parameters or the model's
# function (the model and its config, except the compute dtype and dropout rate) and
# everything that changes the data stream (which windows, in which order, tokenized how).
# Paths, worker counts and the loop schedule may change freely.
RESUME_FREE_MODEL_FIELDS = ("dtype", "dropout")
RESUME_FIXED_DATA_FIELDS = (
    "corpus",
    "tokenizer",
    "seq_len",
    "batch_size",
    "mode",
    "seed",
    "eval_fraction",
    "eval_split",
    "tokenizer_options",
    "segment_ids",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    steps: total optimizer steps of the run (a resumed run continues up to it).
    eval_every / save_every / log_every: in steps (0 disables periodic eval/save; the
      run always evaluates and saves at its end). eval_batches: 0 = the whole split.
    nan_policy: 'stop' ends the run on a non-finite loss, keeping the last good checkpoint;
      'skip' drops that update and goes on.
    data_parallel: shard each batch over all devices (all processes' devices when multi-host).
    profile_steps: 'A:B' traces steps A..B-1 with jax.profiler into RUN_DIR/profile.
    metrics: the Manas/Buddhi/Viveka/Smriti metrics and per-module gradient norms and
      update ratios, computed inside the step: 'on', 'faithful' (the original's
      definitions) or 'off'.
    diagnostics_every: steps between TensorBoard histograms of the recurrence spectrum,
      routing and memory slot usage (0 = never).
    """

    steps: int = 300
    eval_every: int = 100
    eval_batches: int = 0
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    nan_policy: str = "stop"
    data_parallel: bool = False
    sample_tokens: int = 64
    sample_prompt: str = ""
    sample_temperature: float = 0.8
    profile_steps: str = ""
    tensorboard: bool = True
    progress: bool = True
    metrics: str = "on"
    diagnostics_every: int = 100

    def __post_init__(self) -> None:
        positive_int(self, "steps", "keep_checkpoints", "log_every")
        nonnegative_int(
            self, "eval_every", "eval_batches", "save_every", "sample_tokens", "seed",
            "diagnostics_every",
        )  # fmt: skip
        one_of(self, "nan_policy", NAN_POLICIES)
        one_of(self, "metrics", INSIGHT_MODES)
        require(self.sample_temperature >= 0, self, "sample_temperature", ">= 0 (0 = greedy)")
        if self.profile_steps:
            self.profile_range()

    def profile_range(self) -> tuple[int, int] | None:
        """``profile_steps`` 'A:B' as (A, B), or None."""
        if not self.profile_steps:
            return None
        try:
            a, b = (int(x) for x in self.profile_steps.split(":"))
        except ValueError:
            a, b = -1, -1
        if not 0 <= a < b:
            raise ConfigError(
                f"TrainConfig.profile_steps = {self.profile_steps!r} is invalid: "
                "allowed 'A:B' with 0 <= A < B (steps A..B-1 are traced)"
            )
        return a, b


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run. ``model`` is 'family:preset'; ``model_config`` the resolved config."""

    model: str
    model_config: Any
    data: DataConfig
    optim: OptimConfig
    loss: LossConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if self.data.segment_ids:
            check_segment_resets(self.family, self.model_config)

    @property
    def family(self) -> ModelFamily:
        return resolve_model(self.model)[0]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: cfgs.to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Inverse of ``to_dict``; a missing or malformed section is a ``ConfigError``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run config is a JSON object, got {type(data).__name__}")
        missing = [s for s in RUN_SECTIONS if s not in data]
        if missing:
            raise ConfigError(f"missing section(s) {', '.join(missing)}")
        if not isinstance(data["model"], str):
            raise ConfigError(f"model = {data['model']!r} is invalid: allowed 'family:preset'")
        family = get_family(data["model"].rpartition(":")[0] or "qpf")
        sections = {"model_config": family.config_cls, "data": DataConfig, "optim": OptimConfig}
        sections |= {"loss": LossConfig, "train": TrainConfig}
        built = {}
        for name, config_cls in sections.items():
            if not isinstance(data[name], Mapping):
                raise ConfigError(f"section {name} is not a JSON object")
            built[name] = cfgs.from_dict(config_cls, data[name])
        return cls(model=data["model"], **built)

    def with_overrides(self, overrides: Mapping[str, str]) -> RunConfig:
        """Apply ``section.field=value`` overrides (sections: model, data, optim, loss, train)."""
        grouped: dict[str, dict[str, str]] = {}
        for key, value in overrides.items():
            section, _, rest = key.partition(".")
            if section == "model":
                section = "model_config"
            if section not in ("model_config", "data", "optim", "loss", "train") or not rest:
                raise ConfigError(
                    f"--set {key}: keys look like SECTION.FIELD with SECTION one of "
                    "model, data, optim, loss, train (e.g. model.dim=128, optim.lr=3e-4)"
                )
            grouped.setdefault(section, {})[rest] = value
        changes = {
            section: cfgs.apply_overrides(getattr(self, section), values)
            for section, values in grouped.items()
        }
        return dataclasses.replace(self, **changes)


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


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


def resume_differences(saved: RunConfig, requested: RunConfig) -> list[str]:
    """``field: saved -> requested`` for each difference that forbids resuming ``saved``.

    Differences in the model (``model``, any ``model`` field but the compute dtype and
    dropout) or in the data stream (``RESUME_FIXED_DATA_FIELDS``) are listed.
    """
    out = []
    if saved.model != requested.model:  # another preset: its field differences say no more
        out.append(f"model: {saved.model} -> {requested.model}")
    else:
        old = _flatten(cfgs.to_dict(saved.model_config), "model")
        new = _flatten(cfgs.to_dict(requested.model_config), "model")
        for key in sorted(set(old) | set(new)):
            if key.split(".")[1] in RESUME_FREE_MODEL_FIELDS:
                continue
            if old.get(key) != new.get(key):
                out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    for name in RESUME_FIXED_DATA_FIELDS:
        a, b = getattr(saved.data, name), getattr(requested.data, name)
        if cfgs.to_dict(a) != cfgs.to_dict(b):
            out.append(f"data.{name}: {a!r} -> {b!r}")
    return out
