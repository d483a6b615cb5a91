"""Runs in a subprocess with 4 forced host devices for ``tests/test_data_parallel.py``.

A tiny QPF model with the Pallas scan (interpret mode on CPU) takes one plain-SGD train
step on one device and under GSPMD data parallelism over 4 devices (with and without
strided gradient accumulation). Prints one JSON object: the loss and the SGD update
(lr = 1, so update = -gradient) of each run, where the jaxpr puts the Pallas calls, and
which collectives the compiled 4-device programs contain.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kernels  # noqa: F401  (registers scan_type='pallas')
from qpf import config as cfgs
from qpf.models.phase_field import QPFModel
from qpf.training import distributed as dist
from qpf.training.objectives import LossConfig
from qpf.training.step import init_train_state, make_train_step

# Dropout off: an accumulated step draws other masks than the one-batch step.
CFG = cfgs.ModelConfig(
    vocab_size=31,
    dim=6,
    banks=(cfgs.SemanticBankConfig(num_concepts=5, num_layers=1, dropout=0.0),),
    backbone=cfgs.BackboneConfig(state_dim=7, num_layers=1, dropout=0.0, scan_type="pallas"),
    coupler=cfgs.CouplerConfig(dropout=0.0),
    memory=None,
    episodic=None,
)
ROWS, LENGTH = 8, 7  # 8 rows: 2 per device, and 1 per device per micro-batch at accum 2


def _pallas_placement(jaxpr: Any, inside: bool = False) -> list[bool]:
    """For every pallas_call in ``jaxpr`` (recursively): is it inside a shard_map?"""
    found = []
    for eqn in jaxpr.eqns:
        here = inside or eqn.primitive.name == "shard_map"
        if eqn.primitive.name == "pallas_call":
            found.append(inside)
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    found += _pallas_placement(inner, here)
    return found


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    module = QPFModel(CFG)
    loss_cfg = LossConfig(coherence=0.0, coupling=0.0)  # exact under accumulation
    tx = optax.sgd(1.0)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (ROWS, LENGTH), 0, 31))
    mask = np.ones((ROWS, LENGTH), bool)
    mask[3, 5:] = False
    batch = {"tokens": tokens, "mask": mask}
    state = init_train_state(module, tx, 0, jnp.asarray(tokens[:1]))
    out: dict[str, Any] = {}

    def record(name: str, new_state: Any, metrics: Any) -> None:
        update = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_state.params,
                              state.params)  # fmt: skip
        out[name] = {
            "loss": float(metrics["loss"]),
            "update": [u.ravel().tolist() for u in jax.tree.leaves(update)],
            # The update is read off float32 parameters: it is exact to their ulp only.
            "ulp": [np.spacing(np.abs(np.asarray(p))).ravel().tolist()
                    for p in jax.tree.leaves(new_state.params)],
        }  # fmt: skip

    one = jax.jit(make_train_step(module, tx, loss_cfg, seed=0))
    record("one", *one(jax.device_put(state, jax.devices()[0]), batch))

    mesh = dist.make_mesh(True)
    repl, rows = dist.replicated(mesh), dist.batch_sharding(mesh)
    sharded = dist.global_batch(batch, mesh)
    placed = jax.device_put(state, repl)
    for accum in (1, 2):
        step = dist.under_mesh(
            make_train_step(module, tx, loss_cfg, seed=0, grad_accum=accum), mesh
        )
        jitted = jax.jit(step, in_shardings=(repl, rows), out_shardings=(repl, repl))
        record(f"dp{accum}", *jitted(placed, sharded))
        closed = jax.make_jaxpr(step)(placed, sharded)
        hlo = jitted.lower(placed, sharded).compile().as_text()
        out[f"dp{accum}"]["pallas_in_shard_map"] = _pallas_placement(closed.jaxpr)
        out[f"dp{accum}"]["collectives"] = sorted(
            set(re.findall(r"\b(all-gather|all-to-all|all-reduce|collective-permute)", hlo))
        )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
