"""Optimizer: weight-decay mask, warmup + cosine schedule in optimizer steps, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf import config as cfgs
from qpf.config import ConfigError
from qpf.models.phase_field import QPFModel
from qpf.training.optim import OptimConfig, decay_mask, decays, lr_schedule, make_optimizer


def _tiny_params():
    cfg = cfgs.ModelConfig(
        vocab_size=29,
        dim=6,
        banks=(cfgs.SemanticBankConfig(num_concepts=7), cfgs.ContextBankConfig()),
        backbone=cfgs.BackboneConfig(state_dim=10, num_layers=2),
        memory=cfgs.MemoryConfig(num_slots=11),
    )
    return jax.eval_shape(
        QPFModel(config=cfg).init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32)
    )["params"]


def test_decay_mask_excludes_norms_scales_biases_damping_rotations():
    mask = decay_mask(_tiny_params())
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    decayed = {k for k, v in flat.items() if v}
    kept = set(flat) - decayed
    assert any(k.endswith("embedding_re") for k in decayed)
    assert any(k.endswith("kernel_re") for k in decayed)
    assert any(k.endswith("concept_table") for k in decayed)
    for name in ("scale", "bias", "bias_re", "damping", "skew", "layer_scales", "memory_scale"):
        hits = [k for k in flat if k.rsplit("/", 1)[-1] == name]
        if hits:
            assert all(k in kept for k in hits), name
    assert not decays("interference_phases_semantic")
    assert not decays("window_weights")


def test_schedule_warmup_then_cosine_by_optimizer_steps():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, 1e-3, total_steps=100)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 45 / 90))
    np.testing.assert_allclose(float(sched(55)), mid, rtol=1e-5)


def test_weight_decay_applies_only_where_masked():
    params = {"kernel": jnp.ones((3, 2)), "scale": jnp.ones((2,))}
    tx, _ = make_optimizer(OptimConfig(warmup_steps=0, weight_decay=0.5, clip_norm=0), 0.1, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["kernel"]).max()) > 0  # decay pulls kernels toward 0
    assert float(jnp.abs(updates["scale"]).max()) == 0.0


def test_clipping_bounds_the_update_norm():
    params = {"kernel": jnp.zeros((4,))}
    tx, _ = make_optimizer(
        OptimConfig(warmup_steps=0, weight_decay=0.0, clip_norm=1.0, b1=0.0, b2=0.0), 1.0, 10
    )
    grads = {"kernel": jnp.full((4,), 100.0)}
    clipped = tx.update(grads, tx.init(params), params)[0]
    # Adam with b1=b2=0 normalises the clipped gradient elementwise: magnitude ~= lr.
    assert np.all(np.abs(np.asarray(clipped["kernel"])) <= 1.0 + 1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", -1.0), ("warmup_steps", -1), ("min_lr_ratio", 2.0), ("grad_accum", 0), ("b2", 1.0)],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"OptimConfig.{field}"):
        OptimConfig(**{field: value})
