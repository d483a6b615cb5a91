"""Property checks shared by the family-generic tests and the families' own tests.

Each check takes jitted callables and arrays, and returns a list of failures (an empty list
means the property holds), so a test can report every failure at once and a negative
control can assert that a broken input is caught.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Apply = Callable[[jax.Array, Any], Any]  # (inputs, state) -> ModelOutput


@functools.cache
def _compiled(module: nn.Module) -> tuple[Callable, Apply]:
    return jax.jit(module.init), jax.jit(lambda p, x, s: module.apply({"params": p}, x, s))


def build(module: nn.Module, vocab: int, batch: int = 2, t: int = 13, seed: int = 0):
    """(params, tokens ``[batch, t]``, jitted apply(params, inputs, state)) for ``module``.

    The jitted functions are cached per module (Flax modules hash by their config), so
    every test of one config shares one compilation.
    """
    init, apply = _compiled(module)
    tokens = jax.random.randint(jax.random.key(seed), (batch, t), 0, vocab)
    params = init(jax.random.key(seed + 1), tokens)["params"]
    return params, tokens, apply


def build_model(
    model_cls: Callable[[Any], nn.Module], config: Any, batch: int = 2, t: int = 13, seed: int = 0
):
    """(module, params, tokens, apply) for ``model_cls(config)`` (a module class or a
    family's ``build``), as ``build``."""
    module = model_cls(config)
    return (module, *build(module, config.vocab_size, batch, t, seed))


def variant_failures(module: nn.Module, vocab: int, positions: Sequence[int]) -> list[str]:
    """Causality and gradient-to-every-parameter/row failures of one config variant."""
    params, tokens, run = build(module, vocab, batch=3)
    failures = future_leaks(lambda x: run(params, x, None).logits, tokens[:1], vocab, positions)

    def loss(p):
        out = module.apply(
            {"params": p}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)}
        )
        return mean_ce_loss(out.logits, tokens)

    grads = jax.jit(jax.grad(loss))(params)
    return failures + dead_gradients(grads, tokens[:, :-1], vocab)


@dataclasses.dataclass(frozen=True)
class SmallModel:
    """A family's small test model: ``family.build`` over variants of ``config_cls(**base)``."""

    family: Any  # qpf.models.family.ModelFamily
    base: tuple[tuple[str, Any], ...]

    def config(self, **changes: Any) -> Any:
        """The family's config with the base fields and ``changes`` (validated)."""
        return self.family.config_cls(**{**dict(self.base), **changes})

    def build(self, config: Any, batch: int = 2, t: int = 13, seed: int = 0):
        """(module, params, tokens ``[batch, t]``, jitted apply), compiled once per config."""
        return build_model(self.family.build, config, batch, t, seed)

    def variant_failures(self, positions: Sequence[int], /, **changes: Any) -> list[str]:
        """Causality and gradient-to-every-parameter/row failures of ``config(**changes)``."""
        config = self.config(**changes)
        return variant_failures(self.family.build(config), config.vocab_size, positions)

    def round_trip_failures(self, **changes: Any) -> list[str]:
        """Failures of ``config(**changes)`` to come back equal from JSON (``to_json`` ->
        ``from_dict``) and from a no-op ``apply_overrides``."""
        from qpf import config as cfgs

        config = self.config(**changes)
        again = cfgs.from_dict(self.family.config_cls, json.loads(cfgs.to_json(config)))
        same = cfgs.apply_overrides(config, {})
        pairs = (("from_dict(to_json)", again), ("apply_overrides({})", same))
        return [f"{what}: {got!r} != {config!r}" for what, got in pairs if got != config]


def small_model(family: Any, **base: Any) -> SmallModel:
    """The small-model builder of a family's own tests: ``small_model(TRANSFORMER_FAMILY,
    vocab_size=31, dim=12, ...)``; see ``SmallModel``."""
    return SmallModel(family, tuple(base.items()))


def preset_count_failures(family: Any, presets: Any, rel: float = 0.10) -> list[str]:
    """Presets of ``family`` whose parameter count is not within ``rel`` of the qpf preset
    of the same name, or whose default tokenizer does not follow the ``-byte`` suffix."""
    from qpf.models.param_count import family_param_count, parameter_report
    from qpf.presets import get_preset

    failures = []
    for name, preset in presets.items():
        count = family_param_count(family, preset.model)
        ref = parameter_report(get_preset(name).model)["total"]
        if abs(count / ref - 1) >= rel:
            failures.append(f"{family.name}:{name} has {count:,} parameters, qpf:{name} {ref:,}")
        if preset.tokenizer != ("byte" if name.endswith("-byte") else "gpt2"):
            failures.append(f"{family.name}:{name} default tokenizer {preset.tokenizer}")
    return failures


def perturb_params(params: Any, seed: int = 0, scale: float = 0.5) -> Any:
    """Params moved off their initialisation: each leaf + scale·σ·N(0, 1).

    σ is the leaf's own spread (or 0.02 for constant leaves such as zero biases and unit
    gains), so residual scales initialised at zero no longer hide branches from a check.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, leaf in zip(keys, leaves, strict=True):
        sigma = jnp.maximum(jnp.std(leaf.astype(jnp.float32)), 0.02)
        out.append(leaf + (scale * sigma * jax.random.normal(k, leaf.shape)).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def future_leaks(logits_of: Callable[[jax.Array], jax.Array], tokens: jax.Array, vocab: int,
                 positions: Sequence[int]) -> list[str]:  # fmt: skip
    """Positions t where changing token t moved a logit before t (or moved nothing at all).

    ``tokens`` is ``[1, T]``; one call scores the original and every perturbed copy
    (row i changes token ``positions[i]``), so the check costs one compiled forward.
    """
    rows = [tokens[0]] + [tokens[0].at[t].set((tokens[0, t] + 1 + t) % vocab) for t in positions]
    logits = np.asarray(logits_of(jnp.stack(rows)), np.float64)
    failures = []
    for i, t in enumerate(positions, start=1):
        before = np.abs(logits[i, :t] - logits[0, :t]).max(initial=0.0)
        if before > 1e-6 * max(1.0, np.abs(logits[0]).max()):
            failures.append(f"token {t} moved logits before it by {before:.3g}")
        if np.array_equal(logits[i, t:], logits[0, t:]):
            failures.append(f"token {t} moved no logit at or after it (vacuous check)")
    return failures


def dead_gradients(grads: Any, tokens: np.ndarray, vocab: int) -> list[str]:
    """Parameter leaves with no gradient, non-finite gradients, and unreached table rows.

    A table is any leaf with an axis of length ``vocab``; along that axis every index that
    occurs in ``tokens`` must receive a non-zero gradient (a row the batch used). Pass the
    inputs the loss depends on: ``tokens[:, :-1]`` for next-token CE (the last token of a
    row is only a target, so an untied input table rightly gets nothing from it).
    """
    used = np.unique(np.asarray(tokens))
    failures = []
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name, g = jax.tree_util.keystr(path), np.asarray(g, np.float64)
        if not np.all(np.isfinite(g)):
            failures.append(f"{name}: non-finite gradient")
        elif not np.any(g != 0):
            failures.append(f"{name}: zero gradient")
            continue
        for axis in (a for a, n in enumerate(g.shape) if n == vocab):
            rows = np.moveaxis(g, axis, 0)[used].reshape(len(used), -1)
            dead = used[~np.any(rows != 0, axis=1)]
            if dead.size:
                failures.append(f"{name}: rows {dead.tolist()} (axis {axis}) get no gradient")
    return failures


def piecewise_logits(apply: Apply, tokens: jax.Array, state: Any, cuts: Sequence[int],
                     carry: bool = True) -> tuple[jax.Array, Any]:  # fmt: skip
    """Logits of ``tokens[:, a:b]`` for consecutive cuts, carrying the state between pieces.

    With ``carry=False`` every piece starts again from ``state`` (the negative control: a
    model whose pieces ignore the carried state must then disagree with one pass).
    """
    start, pieces = state, []
    for a, b in itertools.pairwise(cuts):
        out = apply(tokens[:, a:b], state)
        pieces.append(out.logits)
        state = out.state if carry else start
    return jnp.concatenate(pieces, 1), state


def mismatch(a: Any, b: Any, rtol: float, atol: float) -> str:
    """'' when ``a`` and ``b`` agree within tolerances, else the largest error."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b) - (atol + rtol * np.abs(b))
    if np.all(err <= 0):
        return ""
    i = np.unravel_index(np.argmax(err), err.shape)
    return f"max excess {err[i]:.3g} at {i}: {a[i]:.6g} vs {b[i]:.6g}"


def mean_ce(logits: jax.Array, tokens: jax.Array) -> float:
    """Mean next-token cross-entropy of ``logits[t]`` against ``tokens[t + 1]`` (nats)."""
    return float(mean_ce_loss(jnp.asarray(logits), tokens))


def mean_ce_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Traceable mean next-token CE (nats), for gradient checks."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


LN_256 = math.log(256)
