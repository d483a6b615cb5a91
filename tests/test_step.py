"""Train step: accumulation equals one big batch, non-finite steps never touch params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_configs import deterministic_qpf

from qpf import config as cfgs
from qpf.config import ConfigError
from qpf.data import DataConfig
from qpf.models.phase_field import QPFModel
from qpf.training import step as step_module
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.objectives import LossConfig, objective_terms, total_loss
from qpf.training.optim import OptimConfig, make_optimizer
from qpf.training.step import TrainState, init_train_state, make_eval_step, make_train_step
from qpf.zoo import resolve_model

CFG = deterministic_qpf(
    31,
    concepts=7,
    state_dim=10,
    num_layers=2,
    memory=cfgs.MemoryConfig(num_slots=11),
    episodic=cfgs.EpisodicConfig(window=4),
)


DEFAULT_LOSS = LossConfig()


def _setup(grad_accum=1, lr=1e-2, sgd=False, loss_cfg=DEFAULT_LOSS):
    module = QPFModel(config=CFG)
    tx, _ = make_optimizer(OptimConfig(warmup_steps=0), lr, 20)
    if sgd:  # Adam's normalisation amplifies round-off in near-zero gradients; SGD does not
        tx = optax.sgd(lr)
    batch = {
        "tokens": jax.random.randint(jax.random.key(1), (4, 7), 0, 31),
        "mask": jnp.ones((4, 7), bool).at[3, 5:].set(False),
    }
    state = init_train_state(module, tx, 0, batch["tokens"][:1])
    step = jax.jit(make_train_step(module, tx, loss_cfg, seed=0, grad_accum=grad_accum))
    return module, state, step, batch


def test_loss_matches_objectives_and_accumulation_matches_one_batch():
    # Token-weighted CE accumulates exactly; per-micro-batch means (coherence) would not.
    ce_only = LossConfig(coherence=0.0, coupling=0.0)
    module, state, step1, batch = _setup(1, sgd=True, loss_cfg=ce_only)
    _, _, step2, _ = _setup(2, sgd=True, loss_cfg=ce_only)
    s1, m1 = step1(state, batch)
    s2, m2 = step2(state, batch)
    out = jax.jit(module.apply)({"params": state.params}, batch["tokens"])
    terms = objective_terms(out, batch["tokens"], batch["mask"], ce_only)
    np.testing.assert_allclose(float(m1["loss"]), float(total_loss(terms, ce_only)), 1e-5)
    # SGD makes the update linear in the gradient, so accumulation is exact up to the
    # float32 summation order of the micro-batch gradients. Measured (CPU): CE relative error
    # 7e-8, grad norm 0, params 3e-8 absolute, update (new - old params) 1.05e-6 of each
    # leaf's largest update. Bounds: 10x margin; params 1e-7 (about one float32 ulp of O(1)
    # params, so only the update comparison resolves the micro-batch sums).
    np.testing.assert_allclose(float(m1["ce"]), float(m2["ce"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-6)
    assert int(m1["tokens"]) == 4 * 6 - 2
    for a, b, p in zip(*(jax.tree.leaves(s.params) for s in (s1, s2, state))):
        a, b, p = np.asarray(a), np.asarray(b), np.asarray(p)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        # The updates are compared to 1e-5 of the leaf's largest update, but never finer
        # than one float32 ulp of the new parameter (a - p is exact to that ulp).
        bound = 1e-5 * np.abs(a - p).max() + np.spacing(np.abs(a))
        assert np.all(np.abs((b - p) - (a - p)) <= bound), np.abs((b - p) - (a - p)).max()
    assert int(s1.step) == 1


def test_step_lowers_the_loss():
    # The next test's compiled step (persistent cache); measured loss 3.443 -> 3.305.
    _, state, step, batch = _setup(1)
    first = None
    for _ in range(8):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first


def test_nonfinite_step_leaves_params_untouched():
    _, state, step, batch = _setup(1)
    bad = jax.tree.map(lambda x: x, state)
    leaves, treedef = jax.tree.flatten(bad.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    bad = bad.replace(params=jax.tree.unflatten(treedef, leaves))
    before = jax.tree.map(np.asarray, bad.params)
    opt_before = jax.tree.map(np.asarray, bad.opt_state)
    new, m = step(bad, batch)
    assert int(m["nonfinite"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(opt_before), jax.tree.leaves(new.opt_state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert int(new.step) == 1


@pytest.mark.parametrize(("grad_accum", "insight"), [(1, "off"), (2, "off"), (2, "on")])
def test_step_traces_the_model_once_and_asks_for_features(grad_accum, insight, monkeypatch):
    # No second (eval_shape) trace of the gradient, even when the insight metrics make the
    # accumulated terms model-dependent, and the fused head is used.
    calls = []
    real = step_module.apply_for_features

    def counting(module, *args, **kw):
        out = real(module, *args, **kw)
        calls.append(out.features is not None)
        return out

    monkeypatch.setattr(step_module, "apply_for_features", counting)
    module, _, _, batch = _setup(grad_accum)
    tx, _ = make_optimizer(OptimConfig(warmup_steps=0), 1e-2, 20)
    state = init_train_state(module, tx, 0, batch["tokens"][:1], insight=insight)
    step = make_train_step(module, tx, DEFAULT_LOSS, seed=0, grad_accum=grad_accum, insight=insight)
    jax.make_jaxpr(step)(state, batch)
    assert calls == [True]


def test_eval_counts_target_tokens_and_bytes():
    module, state, _, batch = _setup(1)
    ev = jax.jit(make_eval_step(module, LossConfig()))
    batch = {**batch, "target_bytes": jnp.full((4, 7), 2, jnp.int32)}
    out = ev(state.params, batch)
    assert int(out["tokens"]) == 22
    assert int(out["bytes"]) == 44
    full = jax.jit(module.apply)({"params": state.params}, batch["tokens"])
    logp = jax.nn.log_softmax(full.logits[:, :-1])
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    want = float((nll * batch["mask"][:, 1:]).sum())
    np.testing.assert_allclose(float(out["ce_sum"]), want, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state():
    module = QPFModel(config=CFG.replace(dtype="bfloat16"))
    tx, _ = make_optimizer(OptimConfig(warmup_steps=0), 1e-2, 20)
    batch = {
        "tokens": jax.random.randint(jax.random.key(1), (4, 7), 0, 31),
        "mask": jnp.ones((4, 7), bool),
    }
    state = init_train_state(module, tx, 0, batch["tokens"][:1])
    step = jax.jit(make_train_step(module, tx, LossConfig(), seed=0))
    new, m = step(state, batch)
    assert np.isfinite(float(m["loss"]))
    assert int(m["nonfinite"]) == 0
    for leaf in jax.tree.leaves((new.params, new.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    # The update moved the float32 master weights.
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                     jax.tree.leaves(new.params))]  # fmt: skip
    assert any(moved)


def test_micro_batches_are_strided_rows():
    # Micro-batch i = rows i::n, so a device's contiguous block of rows holds its share of
    # every micro-batch (tests/test_data_parallel.py checks no row moves on 4 devices).
    batch = {"tokens": jnp.arange(12).reshape(6, 2), "mask": jnp.arange(6) % 2 == 0}
    micro = step_module.split_micro_batches(batch, 3)
    assert micro["tokens"].shape == (3, 2, 2)
    for i in range(3):
        np.testing.assert_array_equal(micro["tokens"][i], batch["tokens"][i::3])
        np.testing.assert_array_equal(micro["mask"][i], batch["mask"][i::3])


def test_batch_segment_ids_reach_the_model_in_train_and_eval_steps():
    """The steps pass a batch's ``segment_ids`` (split into strided micro-batches like every
    array): the loss is that of the model called with them, and differs from without."""
    ce_only = LossConfig(coherence=0.0, coupling=0.0)
    module, state, step, batch = _setup(2, sgd=True, loss_cfg=ce_only)
    seg = jnp.zeros((4, 7), jnp.int32).at[:, 3:].set(1).at[1, 5:].set(2)
    _, m = step(state, {**batch, "segment_ids": seg})
    out = jax.jit(lambda p, x, g: module.apply({"params": p}, x, segment_ids=g))(
        state.params, batch["tokens"], seg
    )
    terms = objective_terms(out, batch["tokens"], batch["mask"], ce_only)
    np.testing.assert_allclose(float(m["loss"]), float(total_loss(terms, ce_only)), rtol=1e-5)
    plain = objective_terms(jax.jit(module.apply)({"params": state.params}, batch["tokens"]),
                            batch["tokens"], batch["mask"], ce_only)  # fmt: skip
    assert abs(float(total_loss(plain, ce_only)) - float(m["loss"])) > 1e-5  # ~8e-5 measured
    ev = jax.jit(make_eval_step(module, ce_only))
    got = ev(state.params, {**batch, "segment_ids": seg, "target_bytes": batch["tokens"] * 0})
    np.testing.assert_allclose(float(got["ce_sum"]), float(terms["ce_sum"]), rtol=1e-5)


def test_a_family_without_document_resets_refuses_segment_ids():
    family, preset = resolve_model("wavegpt:test")
    module = family.build(preset.model)
    tx = optax.sgd(0.1)
    step = make_train_step(module, tx, LossConfig(), seed=0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state=tx.init({}))
    batch = {"tokens": jnp.zeros((2, 5), jnp.int32), "mask": jnp.ones((2, 5), bool)}
    with pytest.raises(ConfigError, match=r"'wavegpt'.*segment_ids=false"):
        jax.eval_shape(step, state, {**batch, "segment_ids": jnp.zeros((2, 5), jnp.int32)})
    data = DataConfig(segment_ids=True)
    with pytest.raises(ConfigError, match=r"'wavegpt'.*segment_ids=false"):
        RunConfig("wavegpt:test", preset.model, data, OptimConfig(), LossConfig(), TrainConfig())
    family, preset = resolve_model("diagrnn:test")  # a family that resets: accepted
    RunConfig("diagrnn:test", preset.model, data, OptimConfig(), LossConfig(), TrainConfig())
