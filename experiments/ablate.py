"""Ablation grids: named variants of a model trained on the same batches and token budget.

    python -m experiments.ablate --grid v4-to-v5 --data tinystories --tokens 300000 \
        --out runs/ablate-v4-to-v5
    python -m experiments.ablate --list            # the grids and their variants
    python -m experiments.ablate --grid v4-to-v5 --plan   # resolved configs and parameter counts

A grid (``GRIDS``, in code) is a list of ``Variant``s: a name, a parent, a ``family:preset``
and config overrides, a dict of dotted field paths to values applied with
``dataclasses.replace`` (``{"backbone.damping_init": 4.0}``, ``{"memory": None}``, tuple
items by index: ``{"banks.0.dropout": 0.0}``). Overrides are the change against the parent:
a variant's config is its preset with its ancestors' overrides and then its own, so adding
an option to a grid is one line::

    Variant("lru", "no-episodic", overrides={"backbone.ssm": "lru"}),

The grid's transformer and DiagRNN baselines (the reference's preset name in those
families) train beside the variants. Every override path is checked against its config
before anything trains (an unknown path is an error naming it and the fields there).

Parameter counts are matched: every model is kept within ``Grid.tolerance`` (5%) of the
reference variant's count (the grid's first) by a small search over one width field (the
family's ``WIDTH_RULES``: qpf ``dim``, with ``backbone.state_dim`` keeping its ratio to it
(N = 2d in the v4 presets); the baselines' ``dim``). A model already within the tolerance
keeps its width; one that no width can match is an error naming the closest width and its
count.

Outputs in ``--out``: ``runs/<variant>/`` (each run: config, metrics, checkpoints),
``results/<variant>.json`` (written when the variant finishes), ``results.json``,
``results.md`` (the table: parameters, validation loss, PPL, bits/byte (byte tokenizer) or
bits/token, train tokens/s, wall-clock, and the validation-loss delta against the parent)
and ``curves.png`` (validation and train loss against tokens). Running again skips every
variant with a result; a variant interrupted mid-run resumes from its newest checkpoint
(saved at every evaluation). Results of a different setup (tokens, data, config) in the
same ``--out`` are refused rather than mixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import equal_budget
from experiments.cli import run_main, setup_logging
from qpf.config import ConfigError, MatrixStateConfig
from qpf.data.tokenizers import get_tokenizer
from qpf.models.family import ModelFamily
from qpf.models.param_count import count_by_component, family_param_count, param_shapes
from qpf.training.checkpoint import RunCheckpoints
from qpf.training.config import RunConfig, fit_model_to_tokenizer
from qpf.training.trainer import TrainingDiverged
from qpf.zoo import resolve_model

DEFAULT_GRID = "v4-to-v5"
DEFAULT_TOKENS = 300_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# --------------------------------------------------------------------------- overrides


def _hint_accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the type hint ``hint`` (None: the hint is too rich to tell)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        verdicts = [_hint_accepts(a, value) for a in typing.get_args(hint)]
        return True if any(v is True for v in verdicts) else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        return isinstance(value, tuple)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return None


def _field_hint(obj: Any, name: str) -> Any:
    try:
        return typing.get_type_hints(type(obj))[name]
    except Exception:  # a hint naming something its module cannot resolve: no type check
        return Any


def _replace_path(obj: Any, parts: Sequence[str], value: Any, path: str, done: str) -> Any:
    """``obj`` with the field at ``parts`` set to ``value`` (nested ``dataclasses.replace``)."""
    head, rest = parts[0], parts[1:]
    here = f"{done}.{head}" if done else head
    if isinstance(obj, tuple):
        if not (head.isdigit() and int(head) < len(obj)):
            raise ConfigError(
                f"override {path!r}: {done} is a tuple of {len(obj)} items; "
                f"address one by index 0..{len(obj) - 1} (got {head!r})"
            )
        i = int(head)
        new = value if not rest else _replace_path(obj[i], rest, value, path, here)
        return (*obj[:i], new, *obj[i + 1 :])
    if obj is None:
        raise ConfigError(
            f"override {path!r}: {done} is disabled (None); enable it before setting its fields"
        )
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"override {path!r}: {done} = {obj!r} has no fields")
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    if head not in names:
        raise ConfigError(
            f"override {path!r}: {type(obj).__name__} has no field {head!r} "
            f"(its fields: {', '.join(names)})"
        )
    if rest:
        new = _replace_path(getattr(obj, head), rest, value, path, here)
    else:
        new = value
        if _hint_accepts(_field_hint(obj, head), value) is False:
            raise ConfigError(
                f"override {path!r}: {value!r} does not fit {type(obj).__name__}.{head} "
                f"(type {_field_hint(obj, head)}, now {getattr(obj, head)!r})"
            )
    try:
        return dataclasses.replace(obj, **{head: new})
    except ConfigError as err:
        raise ConfigError(f"override {path!r}: {err}") from None


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """``config`` with each dotted ``path -> value`` set, in order, through
    ``dataclasses.replace`` (so every touched config validates itself again).

    Paths name dataclass fields (``backbone.damping_init``) or tuple items by index
    (``banks.0.dropout``). An unknown field, a field under a disabled (None) section, a
    value of the wrong type or one its config rejects raises ``ConfigError`` naming the path.
    """
    for path, value in overrides.items():
        if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
            raise ConfigError(f"override {path!r}: expected a dotted field path like 'dim'")
        config = _replace_path(config, path.split("."), value, path, "")
    return config


def get_path(config: Any, path: str) -> Any:
    """The value at dotted ``path`` of ``config`` (tuple items by index)."""
    node = config
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, tuple) else getattr(node, part)
    return node


# ------------------------------------------------------------------------------ grids


@dataclasses.dataclass(frozen=True)
class WidthRule:
    """How a family's parameter count is matched: the width field, the multiple its value
    must be (a function of the config, e.g. twice the transformer's head count for even
    rotary head widths) and fields scaled with it (``ties``: each keeps its ratio to the
    width in the config being matched, e.g. the v4 presets' SSM state of twice the width)."""

    field: str
    multiple: Callable[[Any], int] = lambda config: 1
    ties: tuple[str, ...] = ()


WIDTH_RULES: dict[str, WidthRule] = {
    # The v4 presets size the SSM state from the width (N = 2d); it scales along.
    "qpf": WidthRule("dim", ties=("backbone.state_dim",)),
    "transformer": WidthRule("dim", multiple=lambda c: 2 * c.num_heads),
    "diagrnn": WidthRule("dim"),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of a grid.

    parent: the variant it changes (None for a root); its validation loss is the delta's
      reference and its overrides are inherited.
    model: 'family:preset'; None takes the parent's.
    overrides: dotted config path -> value, the change against the parent.
    width: a ``WidthRule`` replacing the family's for parameter matching.
    """

    name: str
    parent: str | None = None
    model: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    width: WidthRule | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
    """A named ablation: variants (the first is the parameter-count reference), baseline
    families trained with the reference's preset name, and the count tolerance."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    baselines: tuple[str, ...] = ("transformer", "diagrnn")
    tolerance: float = 0.05

    def all_variants(self) -> tuple[Variant, ...]:
        """The variants, then one root variant per baseline family (named by the family)."""
        if not self.variants or not self.variants[0].model:
            raise ConfigError(f"grid {self.name}: the first variant needs a model 'family:preset'")
        preset = self.variants[0].model.rpartition(":")[2]
        return (*self.variants, *(Variant(f, None, f"{f}:{preset}") for f in self.baselines))


_NO_DROPOUT = {"backbone.dropout": 0.0, "coupler.dropout": 0.0, "banks.0.dropout": 0.0}

GRIDS: dict[str, Grid] = {
    grid.name: grid
    for grid in (
        Grid(
            "v4-to-v5",
            "faithful v4 tiny-byte, then one change at a time (each on top of its parent)",
            (
                Variant("v4", None, "qpf:tiny-byte"),
                # δ = 0.5 + 0.5σ(4) ≈ 0.99 instead of 0.525: the state can outlive one step.
                Variant("damping-4", "v4", overrides={"backbone.damping_init": 4.0}),
                # Short budgets underfit: dropout (backbone, coupler, semantic bank) off.
                Variant("no-dropout", "damping-4", overrides=_NO_DROPOUT),
                Variant(
                    "layer-scale-1", "no-dropout", overrides={"backbone.layer_scale_init": 1.0}
                ),
                Variant("no-memory", "layer-scale-1", overrides={"memory": None}),
                Variant("no-episodic", "no-memory", overrides={"episodic": None}),
                Variant("no-banks", "no-episodic", overrides={"banks": ()}),
                # The v5 options (issue 10), one at a time on top of the plain stack.
                Variant("lru", "no-banks", overrides={"backbone.ssm": "lru"}),
                Variant("rglru", "lru", overrides={"backbone.selectivity": "rglru"}),
                Variant("rms-norm", "rglru", overrides={"backbone.norm": "rms"}),
                # Plain byte input (one byte a position, no patches, no within-patch decoder):
                # the input of the v5 byte presets.
                Variant("plain-bytes", "rms-norm", overrides={"input_mode": "token"}),
                Variant("modswish", "rms-norm", overrides={"backbone.activation": "modswish"}),
                Variant(
                    "glu-mixer", "modswish", overrides={"backbone.channel_mixer": "complex_glu"}
                ),
                Variant("conv4", "glu-mixer", overrides={"backbone.conv_width": 4}),
                Variant("griffin", "conv4", overrides={"backbone.block": "griffin"}),
                Variant("orthogonal", "griffin", overrides={"backbone.init": "orthogonal"}),
                # The matrix-state phase-associative mixer in place of the SSM stack.
                Variant(
                    "matrix",
                    "no-banks",
                    overrides={
                        "backbone": MatrixStateConfig(num_heads=4, head_dim=16, num_layers=4)
                    },
                    width=WidthRule("dim"),  # the matrix state has no state_dim to scale
                ),
            ),
        ),
    )
}


# -------------------------------------------------------------------------- resolving


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A variant ready to train: its family, final config and parameter count."""

    variant: Variant
    spec: str
    family: ModelFamily
    config: Any
    overrides: Mapping[str, Any]
    params: int
    width: tuple[str, Any, Any]  # (field, preset value, value used)


def count_params(family: ModelFamily, config: Any) -> int:
    """Parameters of ``family``'s model for ``config``, from shapes only."""
    if family.name == "qpf":  # its own counter knows the morphological input's shape
        return count_by_component(param_shapes(config))["total"]
    return family_param_count(family, config)


def _ordered(grid: Grid) -> tuple[Variant, ...]:
    variants = grid.all_variants()
    seen: set[str] = set()
    for v in variants:
        where = f"grid {grid.name}, variant {v.name!r}"
        if not _NAME.match(v.name):
            raise ConfigError(f"{where}: names use letters, digits and . _ + - (a folder name)")
        if v.name in seen:
            raise ConfigError(f"{where}: the name is used twice")
        if v.parent is not None and v.parent not in seen:
            raise ConfigError(
                f"{where}: parent {v.parent!r} is not a variant listed before it "
                f"(earlier: {', '.join(sorted(seen)) or 'none'})"
            )
        if v.parent is None and not v.model:
            raise ConfigError(f"{where}: a root variant (no parent) needs a model 'family:preset'")
        seen.add(v.name)
    return variants


def _matched(
    family: ModelFamily,
    config: Any,
    rule: WidthRule,
    explicit: Mapping[str, Any],
    target: int,
    tol: float,
    where: str,
    count: Callable[[ModelFamily, Any], int],
) -> tuple[Any, int]:
    """``config`` with its width set so its count is within ``tol`` of ``target``.

    Keeps the width when already within the tolerance; else searches the multiples k·m of
    the rule's multiple m (counts grow with the width): secant guesses until the target is
    bracketed by adjacent multiples, then the closer one. Tied fields follow the width
    unless the variant sets them itself (``explicit``).
    """
    p0 = count(family, config)
    if abs(p0 - target) <= tol * target:
        return config, p0
    m = rule.multiple(config)
    w0 = get_path(config, rule.field)
    ties = {p: get_path(config, p) / w0 for p in rule.ties if p not in explicit}

    def at(k: int) -> tuple[Any, int]:
        w = k * m
        changes = {rule.field: w, **{p: max(1, round(r * w)) for p, r in ties.items()}}
        try:
            cfg = apply_overrides(config, changes)
        except ConfigError as err:
            raise ConfigError(f"{where}: matching parameters, width {w}: {err}") from None
        return cfg, count(family, cfg)

    cache: dict[int, tuple[Any, int]] = {}

    def p(k: int) -> int:
        if k not in cache:
            cache[k] = at(k)
        return cache[k][1]

    k = max(1, round(w0 / m))
    k_max = max(64, 64 * k)
    lo = hi = None  # largest k with count <= target, smallest with count >= target
    for _ in range(48):
        pk = p(k)
        if pk <= target:
            lo = k if lo is None else max(lo, k)
        if pk >= target:
            hi = k if hi is None else min(hi, k)
        if (lo is not None and hi is not None and hi - lo <= 1) or (hi == 1 and lo is None):
            break
        known = sorted(cache)
        if lo is not None and hi is not None:  # interpolate inside the bracket
            a, b = lo, hi
        elif len(known) >= 2:  # secant through the two known points nearest the target
            a, b = sorted(sorted(known, key=lambda j: abs(p(j) - target))[:2])
        else:
            a = b = k
        if a != b and p(b) != p(a):
            guess = a + (target - p(a)) * (b - a) / (p(b) - p(a))
        elif a != b:
            raise ConfigError(
                f"{where}: changing {rule.field} from {a * m} to {b * m} leaves the parameter "
                f"count at {p(a):,}: it cannot match {target:,}; give the variant another "
                "width field (Variant.width)"
            )
        else:  # one point: counts grow about as width squared
            guess = k * math.sqrt(target / max(pk, 1))
        nxt = round(guess)
        low_bound = (lo + 1) if lo is not None else 1
        high_bound = (hi - 1) if hi is not None else k_max
        nxt = min(max(nxt, low_bound), high_bound)
        if nxt in cache:  # the guess stalled: step towards the target by one
            nxt = min(max(k + (1 if pk < target else -1), low_bound), high_bound)
        if nxt in cache or nxt > k_max:
            break
        k = nxt
    best = min((j for j in (lo, hi) if j is not None), key=lambda j: abs(p(j) - target))
    cfg, n = cache[best]
    if abs(n - target) > tol * target:
        raise ConfigError(
            f"{where}: cannot match the reference's {target:,} parameters within {tol:.0%} "
            f"by changing {rule.field} (closest: {rule.field}={best * m} gives {n:,}, "
            f"{(n - target) / target:+.1%}); change the variant's overrides or its width "
            "field (Variant.width)"
        )
    return cfg, n


def resolve_grid(
    grid: Grid,
    vocab_tokenizer: Any,
    count: Callable[[ModelFamily, Any], int] = count_params,
) -> list[Resolved]:
    """Every variant's final config (overrides applied, vocabulary fitted to the tokenizer,
    parameters matched). All validation happens here, before anything trains."""
    variants = _ordered(grid)
    full: dict[str, dict[str, Any]] = {}
    models: dict[str, str] = {}
    resolved: list[Resolved] = []
    target = None
    for v in variants:
        where = f"grid {grid.name}, variant {v.name!r}"
        spec = v.model or models[v.parent]
        models[v.name] = spec
        overrides = {**(full[v.parent] if v.parent else {}), **dict(v.overrides)}
        full[v.name] = overrides
        try:
            family, preset = resolve_model(spec)
            config = apply_overrides(preset.model, overrides)
            config = fit_model_to_tokenizer(config, vocab_tokenizer)
        except ConfigError as err:
            raise ConfigError(f"{where} ({spec}): {err}") from None
        rule = v.width or WIDTH_RULES.get(family.name)
        if rule is None:
            raise ConfigError(
                f"{where}: no width rule for family {family.name!r}; give Variant.width or add "
                "one to WIDTH_RULES"
            )
        for path in (rule.field, *rule.ties):
            try:
                get_path(config, path)
            except (AttributeError, IndexError, ValueError, TypeError):
                raise ConfigError(
                    f"{where}: the width rule names {path!r}, which {type(config).__name__} "
                    "does not have"
                ) from None
        w0 = get_path(config, rule.field)
        if target is None:  # the reference keeps its preset's shape
            target = count(family, config)
            params = target
        else:
            config, params = _matched(
                family, config, rule, overrides, target, grid.tolerance, where, count
            )
        width = (rule.field, w0, get_path(config, rule.field))
        resolved.append(Resolved(v, spec, family, config, overrides, params, width))
    return resolved


# ----------------------------------------------------------------------------- running


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.ablate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--grid", default=DEFAULT_GRID, help=f"grid name (default {DEFAULT_GRID})")
    ap.add_argument("--list", action="store_true", help="print the grids and exit")
    ap.add_argument(
        "--plan", action="store_true", help="resolve configs and parameter counts; train nothing"
    )
    ap.add_argument("--only", default="", help="comma-separated variant names to train")
    ap.add_argument("--out", type=Path, default=None, help="default runs/ablate-GRID")
    ap.add_argument("--data", default="tinystories", help="corpus name (see qpf.data)")
    ap.add_argument("--data-dir", default=None, help="corpus folder (default $QPF_DATA_DIR)")
    ap.add_argument("--tokenizer", default="byte", choices=("byte", "gpt2"))
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="train tokens per model")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", "--batch-size", dest="batch_size", type=int, default=16)
    ap.add_argument(
        "--eval-every-tokens", type=int, default=None, help="default: a fifth of --tokens"
    )
    ap.add_argument(
        "--eval-batches", type=int, default=16, help="validation batches (0 = whole split)"
    )
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: each preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jax-cache",
        default=os.environ.get("QPF_JAX_CACHE_DIR", ".cache/jax"),
        help="persistent XLA compilation cache ('off' disables; default $QPF_JAX_CACHE_DIR or "
        ".cache/jax): variants that differ only in initial values reuse the compiled step",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap.parse_args(argv)


def list_grids(grids: Mapping[str, Grid]) -> str:
    lines = []
    for grid in grids.values():
        lines.append(f"{grid.name}: {grid.description} (parameters within {grid.tolerance:.0%})")
        for v in grid.all_variants():
            change = ", ".join(f"{k}={val!r}" for k, val in v.overrides.items())
            lines.append(
                f"  {v.name:<16} parent {v.parent or '-':<14} "
                f"{v.model or '(parent model)'}  {change}"
            )
    return "\n".join(lines)


def _comparable(run: RunConfig) -> dict[str, Any]:
    """A run config as stored, minus what may differ between invocations (paths)."""
    d = json.loads(run.to_json())
    for key in ("data_dir", "cache_dir"):
        d["data"].pop(key, None)
    return d


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a crash mid-write never leaves a half result


def _prior_result(path: Path, run: RunConfig, name: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    stored = record.get("run_config")
    if stored is not None:  # fields added since it was written take their defaults
        stored = _comparable(RunConfig.from_dict(stored))
    if stored != _comparable(run):
        raise ConfigError(
            f"{path} holds variant {name!r} trained with another setup (token budget, data, "
            "or model config): choose a new --out, or remove that file and its run folder"
        )
    return record


def _train_variant(r: Resolved, run: RunConfig, run_dir: Path, sched: Any) -> dict[str, Any]:
    """Train (or resume) one variant; its record."""
    resume = False
    if run_dir.exists():
        if RunCheckpoints(run_dir, read_only=True).steps("last"):
            resume = True
        else:  # interrupted before its first checkpoint: nothing to continue
            shutil.rmtree(run_dir)
    return equal_budget.train_one(r.spec, run, run_dir, sched, resume=resume)


def markdown(results: dict[str, Any]) -> str:
    """The ablation table, the validation curves at equal tokens and the run header."""
    env, cfg, rows = results["environment"], results["config"], results["variants"]
    by_name = {row["variant"]: row for row in rows}
    byte = cfg["tokenizer"] == "byte"
    bits = "bits/byte" if byte else "bits/token"
    transformer = by_name.get("transformer")
    lines = [
        f"Grid {cfg['grid']}: ran {env['date']} on {env['device']} ({env['platform']}, "
        f"{env['cpu_count']} CPUs), jax {env['jax_version']}; other processes may have "
        "shared the machine.",
        f"Data: {cfg['data']} ({cfg['tokenizer']} tokenizer), T={cfg['seq_len']}, "
        f"batch {cfg['batch_size']}, {cfg['steps']} steps = {cfg['tokens']:,} tokens per model, "
        f"seed {cfg['seed']}, {cfg['eval_batches'] or 'all'} validation batches. "
        f"Parameters matched to {cfg['reference']} within {cfg['tolerance']:.0%}.",
        f"This invocation: {results['wall_s']:.0f} s wall-clock, trained "
        f"{', '.join(results['trained']) or 'nothing'}.",
        "",
        f"| variant | parent | model | width | params | val loss | Δ vs parent | PPL | "
        f"PPL / transformer | {bits} | train tok/s | wall s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        parent = by_name.get(row["parent"]) if row["parent"] else None
        delta = f"{row['val_loss'] - parent['val_loss']:+.4f}" if parent else "—"
        ratio = f"{row['val_ppl'] / transformer['val_ppl']:.3f}" if transformer else "—"
        field, w0, w = row["width"]
        width = f"{field}={w}" + (f" (was {w0})" if w != w0 else "")
        resumed = " (resumed)" if row.get("resumed_from_step") else ""
        lines.append(
            f"| {row['variant']} | {row['parent'] or '—'} | {row['model']} | {width} | "
            f"{row['params']:,} | {row['val_loss']:.4f} | {delta} | {row['val_ppl']:.3f} | "
            f"{ratio} | {row['val_bpb' if byte else 'val_bits_per_token']:.4f} | "
            f"{row['train_tokens_per_s']:,.0f} | {row['wall_s']:.0f}{resumed} |"
        )
    lines += [
        "",
        "Δ vs parent: validation loss (nats/token) minus the parent's; negative is better. "
        "train tok/s: median train-step throughput (compilation and evaluation excluded).",
        "",
        "Validation loss at equal token counts:",
        "",
        "| tokens | " + " | ".join(row["variant"] for row in rows) + " |",
        "|---:|" + "---:|" * len(rows),
    ]
    points = sorted({p["tokens"] for row in rows for p in row["val_curve"]})
    for tokens in points:
        cells = []
        for row in rows:
            value = next((p["val_loss"] for p in row["val_curve"] if p["tokens"] == tokens), None)
            cells.append("" if value is None else f"{value:.4f}")
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_table(resolved: Sequence[Resolved], target: int) -> str:
    lines = [
        "| variant | parent | model | width | params | vs reference |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in resolved:
        field, w0, w = r.width
        width = f"{field}={w}" + (f" (was {w0})" if w != w0 else "")
        lines.append(
            f"| {r.variant.name} | {r.variant.parent or '—'} | {r.spec} | {width} | "
            f"{r.params:,} | {(r.params - target) / target:+.1%} |"
        )
    return "\n".join(lines)


def _write_outputs(
    out: Path,
    grid: Grid,
    args: argparse.Namespace,
    sched: equal_budget.Schedule,
    names: list[str],
    rows: list[dict[str, Any]],
    trained: list[str],
    skipped: list[str],
    wall_s: float,
) -> dict[str, Any]:
    """results.json, results.md and curves.png from the rows so far (rewritten after every
    variant, so an interrupted grid still has its table)."""
    results = {
        "environment": equal_budget.environment(),
        "config": {
            "grid": grid.name,
            "data": args.data,
            "tokenizer": args.tokenizer,
            **equal_budget.budget_record(args, sched),
            "reference": names[0],
            "tolerance": grid.tolerance,
        },
        "wall_s": wall_s,
        "trained": trained,
        "skipped": skipped,
        "variants": [{k: v for k, v in row.items() if k != "run_config"} for row in rows],
    }
    if rows:
        _write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results) + "\n", encoding="utf-8")
        equal_budget.plot_curves(results["variants"], out / "curves.png", label="variant")
    return results


def run(args: argparse.Namespace, grids: Mapping[str, Grid] = GRIDS) -> dict[str, Any]:
    """Resolve the grid, train what has no result yet, write the table; the results."""
    if args.grid not in grids:
        raise ConfigError(f"--grid {args.grid!r} is unknown: choose one of {', '.join(grids)}")
    grid = grids[args.grid]
    data_dir = args.data_dir or os.environ.get("QPF_DATA_DIR")
    tokenizer = get_tokenizer(args.tokenizer, data_dir=data_dir)
    names = [v.name for v in grid.all_variants()]
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:  # checked before the (slower) resolution
        raise ConfigError(
            f"--only {', '.join(unknown)}: not in grid {grid.name} (its variants: "
            f"{', '.join(names)})"
        )
    resolved = resolve_grid(grid, tokenizer)
    if args.plan:
        return {"plan": resolved, "table": plan_table(resolved, resolved[0].params)}
    sched = equal_budget.Schedule.from_budget(
        args.tokens, args.batch_size, args.seq_len, args.eval_every_tokens
    )
    data, train = equal_budget.shared_sections(
        corpus=args.data,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        sched=sched,
        eval_batches=args.eval_batches,
        # Saved at every evaluation so an interrupted variant resumes; one kept.
        save_every=sched.eval_every,
        keep_checkpoints=1,
    )
    runs = {
        r.variant.name: equal_budget.make_run(r.spec, r.config, data, train, args.lr)
        for r in resolved
    }
    out = args.out or Path("runs") / f"ablate-{grid.name}"
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    rows, trained, skipped = [], [], []
    for r in resolved:
        name = r.variant.name
        path = out / "results" / f"{name}.json"
        record = _prior_result(path, runs[name], name)
        if record is None and (not only or name in only):
            print(
                f"training {name} ({r.spec}, {r.params:,} params): {sched.steps} steps", flush=True
            )
            record = _train_variant(r, runs[name], out / "runs" / name, sched)
            record.update(
                variant=name,
                parent=r.variant.parent,
                overrides={k: repr(v) for k, v in r.overrides.items()},
                width=list(r.width),
                run_config=_comparable(runs[name]),
            )
            _write_json(path, record)
            trained.append(name)
            _write_outputs(
                out,
                grid,
                args,
                sched,
                names,
                [*rows, record],
                trained,
                skipped,
                time.perf_counter() - t0,
            )
            print(
                f"{name}: val loss {record['val_loss']:.4f}  ppl {record['val_ppl']:.3f}  "
                f"bpb {record['val_bpb']:.4f}  ({record['wall_s']:.0f} s)",
                flush=True,
            )
        elif record is not None:
            skipped.append(name)
        if record is not None:
            rows.append(record)
    return _write_outputs(
        out, grid, args, sched, names, rows, trained, skipped, time.perf_counter() - t0
    )


def enable_compilation_cache(folder: str) -> None:
    """Keep every compiled program in ``folder``: a grid compiles the same train step for
    each variant whose changes touch only initial values (damping, layer scales)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        setup_logging()
        args = parse_args(argv)
        if args.list:
            print(list_grids(GRIDS))
            return 0
        if args.jax_cache != "off":
            enable_compilation_cache(args.jax_cache)
        try:
            results = run(args)
        except TrainingDiverged as err:  # a user fault (the learning rate), not a bug
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.plan:
            print(results["table"])
        elif results["variants"]:
            print(markdown(results))
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
