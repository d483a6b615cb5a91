"""QLLM family: config, presets, rotators, causality, globals, decoding, gradients, bf16,
and LoRA-only training with frozen base weights (no optimizer state for them)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.config import ConfigError
from qpf.models.param_count import family_param_count
from qpf.models.qllm import (
    QLLM,
    QLLMConfig,
    init_state,
    param_count,
    phase_coherence_loss,
    phase_gain,
    phase_rotate,
    trainable,
)
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig, make_optimizer
from qpf.training.step import TrainState, make_train_step
from qpf.zoo import get_family, resolve_model

# Transformer presets of the same name (rules: match within 4%).
TRANSFORMER_COUNTS = {
    "tiny": 13_191_552,
    "small": 63_493_120,
    "tiny-byte": 689_664,
    "small-byte": 12_377_600,
}


def cfg(**kw) -> QLLMConfig:
    """Prime-ish shapes with every feature on (globals, LoRA, dropout)."""
    base = dict(
        vocab_size=37, dim=20, num_layers=2, num_heads=4, max_len=19, global_tokens=3,
        lora_rank=3, lora_alpha=6.0, dropout=0.1,
    )  # fmt: skip
    base.update(kw)
    return QLLMConfig(**base)


@functools.cache
def compiled(config: QLLMConfig):
    model = QLLM(config)
    return jax.jit(model.init), jax.jit(
        lambda p, x, s: model.apply({"params": p}, x, s), static_argnums=()
    )


def live_params(config: QLLMConfig, seed: int = 0):
    """Initialised params with the zero-initialised LoRA down-projections and θ perturbed,
    so every path (and every gradient) is live."""
    init, _ = compiled(config)
    params = init(jax.random.key(seed), jnp.zeros((1, 5), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        leaf + 0.05 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(tree, leaves)


def tokens(config: QLLMConfig, b: int = 2, t: int = 13, seed: int = 3):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, config.vocab_size)


# ----------------------------------------------------------------------- config, presets


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_heads": 3}, "num_heads"),
        ({"rotator": "spin"}, "rotator"),
        ({"lora_rank": 0, "lora_train_only": True}, "lora_train_only"),
        ({"dropout": 1.0}, "dropout"),
        ({"rotator": "rotation", "dim": 21, "num_heads": 3}, "dim"),
        ({"global_tokens": -1}, "global_tokens"),
        ({"lora_alpha": 0.0}, "lora_alpha"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        cfg(**kw)


def test_param_counts_presets_and_closed_form():
    family = get_family("qllm")
    for name, preset in family.presets.items():
        counted = family_param_count(family, preset.model)
        assert counted == param_count(preset.model), name
        if name in TRANSFORMER_COUNTS:
            assert abs(counted / TRANSFORMER_COUNTS[name] - 1) < 0.04, (name, counted)
    # Upstream's headline model (spec §3.3): 88,030,464 (85,671,168 without LoRA).
    original = resolve_model("qllm:original")[1].model
    assert param_count(original) == 88_030_464
    assert param_count(original.replace(lora_rank=0)) == 85_671_168
    assert resolve_model("qllm:original")[1].tokenizer == "byte"
    assert param_count(cfg(rotator="rotation")) == family_param_count(
        family, cfg(rotator="rotation")
    )


# ------------------------------------------------------------------------------ rotators


def test_rotators_and_coherence_loss_match_numpy():
    rng = np.random.default_rng(0)
    x, theta = rng.normal(size=(3, 10)), rng.normal(size=10)
    phi = np.pi * np.tanh(theta)
    np.testing.assert_allclose(phase_gain(x, theta), x * np.cos(phi) - x * np.sin(phi), rtol=1e-5)
    # The rotation is multiplication of z = x[:5] + i·x[5:] by e^{iφ}: norm-preserving.
    half = theta[:5]
    z = (x[:, :5] + 1j * x[:, 5:]) * np.exp(1j * np.pi * np.tanh(half))
    rot = np.asarray(phase_rotate(x, half))
    np.testing.assert_allclose(rot, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rot, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    ref = np.mean(np.diff(theta) ** 2) + 0.1 * np.mean(theta**2)
    np.testing.assert_allclose(phase_coherence_loss(theta), ref, rtol=1e-6)


# ------------------------------------------------------- causality, globals, decoding


@pytest.mark.parametrize("kw", [{}, {"rotator": "rotation", "global_tokens": 0, "lora_rank": 0}])
def test_causal_and_globals_reach_every_position(kw):
    c = cfg(**kw)
    _, apply = compiled(c)
    params, x = live_params(c), tokens(c)
    base = apply(params, x, None).logits
    for t in (0, 6, 11):
        changed = x.at[:, t + 1 :].set((x[:, t + 1 :] + 1) % c.vocab_size)
        np.testing.assert_array_equal(
            apply(params, changed, None).logits[:, : t + 1], base[:, : t + 1]
        )
    if c.global_tokens:
        # (a constant shift would vanish in the LayerNorm; a random one does not)
        g = params["global_memory_table"]
        moved = dict(params, global_memory_table=g + jax.random.normal(jax.random.key(9), g.shape))
        diff = jnp.abs(apply(moved, x, None).logits - base).max(-1)
        assert bool((diff > 1e-4).all())  # every text position reads the globals


def test_chunked_decoding_equals_one_forward():
    c = cfg()
    _, apply = compiled(c)
    params, x = live_params(c), tokens(c, t=17)
    full = apply(params, x, None).logits
    state, outs = init_state(c, 2, 20), []
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 17)):
        out = apply(params, x[:, a:b], state)
        state = out.state
        outs.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert int(state["pos"]) == 17
    # Past the cache (20 slots) the logits are NaN rather than silently clamped.
    assert bool(jnp.isnan(apply(params, x[:, :4], state).logits).all())


def test_dropout_is_active_in_training_only():
    c = cfg()
    model, params, x = QLLM(c), live_params(c), tokens(c)
    run = jax.jit(
        lambda k: (
            model.apply({"params": params}, x, deterministic=False, rngs={"dropout": k}).logits
        )
    )
    assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))


# ------------------------------------------------------------------- gradients, bf16


def test_every_parameter_receives_gradient():
    c = cfg()
    model, params, x = QLLM(c), live_params(c), tokens(c, t=c.max_len)

    def loss(p):
        out = model.apply({"params": p}, x)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        ce = -jnp.take_along_axis(logp, x[:, 1:, None], -1).mean()
        return ce + 0.1 * out.coupling_loss

    grads = jax.jit(jax.grad(loss))(params)
    dead = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if not bool((jnp.abs(g) > 0).any())
    ]
    assert not dead, dead
    # Every position row whose output is scored (the last one only predicts past the
    # window; rows >= max_len are never read by a training window).
    pos_rows = jnp.abs(grads["pos_embedding"][: c.max_len - 1]).sum(-1)
    assert bool((pos_rows > 0).all())
    assert bool((jnp.abs(grads["global_memory_table"]).sum(-1) > 0).all())


def test_bfloat16_compute_is_close_to_float32():
    c = cfg(dropout=0.0)
    params, x = live_params(c), tokens(c)
    f32 = compiled(c)[1](params, x, None).logits
    bf16 = compiled(c.replace(dtype="bfloat16"))[1](params, x, None).logits
    assert bf16.dtype == jnp.bfloat16
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(bf16.astype(jnp.float32) - f32).max()) < 0.05 * scale


# ------------------------------------------------------------ LoRA-only training


def _elements(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_frozen_base_has_no_optimizer_state_and_does_not_move():
    c = cfg(lora_train_only=True)
    params = live_params(c)
    mask = trainable(c)(params)
    n_train = sum(
        int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m
    )
    n_all = _elements(params)
    assert 0 < n_train < n_all / 2
    assert trainable(c.replace(lora_train_only=False)) is None

    optim = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.5)
    tx_frozen, _ = make_optimizer(optim, 1e-2, 10, trainable(c))
    tx_full, _ = make_optimizer(optim, 1e-2, 10)
    # AdamW keeps two moments per trainable element (plus scalar step counts).
    frozen_state, full_state = tx_frozen.init(params), tx_full.init(params)
    assert _elements(full_state) - 2 * n_all < 8
    assert 2 * n_train <= _elements(frozen_state) < 2 * n_train + 8

    step = jax.jit(make_train_step(QLLM(c), tx_frozen, LossConfig(), seed=0))
    x = tokens(c, b=4, t=11)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=frozen_state)
    new, metrics = step(state, {"tokens": x, "mask": jnp.ones(x.shape, bool)})
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), new.params, params)
    for path, m in jax.tree_util.tree_leaves_with_path(mask):
        changed = jax.tree_util.keystr(path)
        value = functools.reduce(lambda t, k: t[k.key], path, moved)
        assert value == bool(m), changed
