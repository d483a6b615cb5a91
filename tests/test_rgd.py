"""Resonant Gradient Descent: parity with the original optimizer's steps, gradients of the
model's QFE loss, chaining with optax, and selection through ``OptimConfig.name``.

Fixture ``rgd_step*.npz`` (README there): three hyperparameter runs fed the same two
gradients. Tolerances (README recommendation 2/3): float32 params rtol 0 / atol 2e-6,
exp_avg rtol 1e-5 / atol 1e-9, exp_avg_sq rtol 1e-5 / atol 1e-14; float64 params atol 1e-9
(the original gates in complex64), moments rtol 1e-9 / atol 1e-11. Gradients of the QFE
loss of the small WaveGPT: float32 rtol 1e-4 / atol 1e-5 (the file's own f32-vs-f64 gap is
<= 3.5e-8 absolute), float64 rtol 1e-7 / atol 1e-9 (QFE's complex64 target spectrum).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fixture_files
from parity_log import each_fixture, record

from qpf.config import ConfigError
from qpf.models import wavegpt_weights as ww
from qpf.models.wavegpt import WaveGPT
from qpf.training import qfe
from qpf.training.optim import OptimConfig, decay_mask, make_optimizer
from qpf.training.rgd import rgd

TOL_F32 = {
    "param": {"rtol": 0.0, "atol": 2e-6},
    "exp_avg": {"rtol": 1e-5, "atol": 1e-9},
    "exp_avg_sq": {"rtol": 1e-5, "atol": 1e-14},
}
TOL_F64 = {
    "param": {"rtol": 0.0, "atol": 1e-9},
    "exp_avg": {"rtol": 1e-9, "atol": 1e-11},
    "exp_avg_sq": {"rtol": 1e-9, "atol": 1e-11},
}


def load(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def names(z: dict) -> list[str]:
    return [k[len("grad/step1/") :] for k in z if k.startswith("grad/step1/")]


def run_optimizer(z: dict, run: str, hp: dict, dtype: str) -> list[str]:
    """Two steps of ``run`` on the torch-named params; every mismatching key."""
    keys = names(z)
    params = {n: jnp.asarray(z[f"param/{n}"], dtype) for n in keys}
    tx = rgd(
        hp["lr"],
        b1=hp["betas"][0],
        b2=hp["betas"][1],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        resonance_strength=hp["resonance_strength"],
        resonance_warmup=hp["warmup_steps"],
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    pre = "f64/" if dtype == "float64" else ""
    tol = TOL_F64 if dtype == "float64" else TOL_F32
    failures = []
    for s in (1, 2):
        grads = {n: jnp.asarray(z[f"grad/step{s}/{n}"], dtype) for n in keys}
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        got = {"param": params, "exp_avg": state.mu, "exp_avg_sq": state.nu}
        for kind, tree in got.items():
            for n in keys:
                ref = z[f"{pre}{run}/step{s}/{kind}/{n}"]
                val = np.asarray(tree[n], np.float64)
                record(f"{pre}{run}/step{s}/{kind}/{n}", val, ref)
                if not np.allclose(val, ref, **tol[kind]):
                    err = np.max(np.abs(val - ref))
                    failures.append(f"{run}/step{s}/{kind}/{n}: max abs err {err:.3g}")
        record(f"{run}/step{s}/step_count", state.count, z[f"{run}/step{s}/step_count"])
        steps = np.array([int(k) for k in jax.tree.leaves(state.steps)])
        record(
            f"{run}/step{s}/state_step", steps, np.full_like(steps, z[f"{run}/step{s}/state_step"])
        )
        if int(state.count) != int(z[f"{run}/step{s}/step_count"]):
            failures.append(f"{run}/step{s}/step_count: {int(state.count)}")
        if any(int(k) != int(z[f"{run}/step{s}/state_step"]) for k in jax.tree.leaves(state.steps)):
            failures.append(f"{run}/step{s}/state_step differs")
    return failures


def test_rgd_parity_optimizer_steps(parity_dtype):
    dtype = parity_dtype
    failures = []
    for path in each_fixture(fixture_files("wavegpt", "rgd_step*.npz")):
        z = load(path)
        runs = json.loads(str(z["config_json"]))["call"]["runs"]
        for run, hp in runs.items():
            failures += [f"{path.name} {f}" for f in run_optimizer(z, run, hp, dtype)]
    assert not failures, "\n".join(failures)


def torch_grads(z: dict, params_key: str, dtype: str) -> tuple[dict, float]:
    """Gradients of QFE(λ from the file) of the loaded WaveGPT, by torch parameter name."""
    config, _ = ww.load_fixture_model(z, dtype)
    sd = {n: z[f"{params_key}{n}"] for n in names(z)}
    sd["embedding.harmonic_mults"] = z["param/embedding.harmonic_mults"]
    params = ww.params_from_state_dict(sd, np.dtype(dtype))
    lam = json.loads(str(z["config_json"]))["call"]["qfe"]["lambda_coherence"]
    ids, targets = jnp.asarray(z["input_ids"]), jnp.asarray(z["targets"])

    def loss(p):
        logits = WaveGPT(config).apply({"params": p}, ids).logits
        return qfe.qfe_loss(logits, targets, lam)["total"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    out = {}
    for n in names(z):
        node = grads
        path = ww._flax_path(n)
        for key in path:
            node = node[key]
        out[n] = np.asarray(node.T if path[-1] == "kernel" else node, np.float64)
    return out, float(value)


def test_rgd_parity_model_gradients(parity_dtype):
    """grad/step1 at the stored params, grad/step2 at bench's params after its step."""
    dtype = parity_dtype
    f64 = dtype == "float64"
    tol = {"rtol": 1e-7, "atol": 1e-9} if f64 else {"rtol": 1e-4, "atol": 1e-5}
    pre = "f64/" if f64 else ""
    failures = []
    for path in each_fixture(fixture_files("wavegpt", "rgd_step*.npz")):
        z = load(path)
        for s, params_key in ((1, "param/"), (2, f"{pre}bench/step1/param/")):
            grads, value = torch_grads(z, params_key, dtype)
            record(f"{pre}bench/step{s}/loss", value, z[f"{pre}bench/step{s}/loss"])
            if not np.isclose(value, z[f"{pre}bench/step{s}/loss"], **tol):
                failures.append(
                    f"{path.name} bench/step{s}/loss: {value} vs {z[f'{pre}bench/step{s}/loss']}"
                )
            for n, g in grads.items():
                ref = z[f"{pre}grad/step{s}/{n}"]
                record(f"{pre}grad/step{s}/{n}", g, ref)
                if not np.allclose(g, ref, **tol):
                    failures.append(
                        f"{path.name} grad/step{s}/{n}: max abs err {np.max(np.abs(g - ref)):.3g}"
                    )
    assert not failures, "\n".join(failures)


def test_rgd_zero_strength_is_adamw_and_gate_only_shrinks():
    key = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(key[0], (5, 7)), "b": jax.random.normal(key[1], (7,))}
    grads = {"w": jax.random.normal(key[2], (5, 7)), "b": jnp.ones((7,))}
    plain = rgd(1e-2, weight_decay=0.1, resonance_strength=0.0)
    ref = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    u1, _ = plain.update(grads, plain.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    for k in params:
        # RGD returns new_p - p (the original's arithmetic), AdamW -lr·(u + wd·p): they differ
        # by float32 rounding of p (|p| <= 4 here -> <= 5e-7).
        np.testing.assert_allclose(u1[k], u2[k], rtol=1e-5, atol=5e-7)
    strong = rgd(1e-2, weight_decay=0.0, resonance_strength=1.0, resonance_warmup=0)
    u3, _ = strong.update(grads, strong.init(params), params)
    adam = rgd(1e-2, weight_decay=0.0, resonance_strength=0.0)
    u1, _ = adam.update(grads, adam.init(params), params)
    # ρ <= 1 in every Fourier bin: the update's spectral energy can only shrink.
    assert float(jnp.sum(u3["w"] ** 2)) < float(jnp.sum(u1["w"] ** 2))
    np.testing.assert_allclose(u3["b"], u1["b"], rtol=1e-6)  # 1-D: plain Adam


def test_rgd_selected_by_optim_name_and_chains_with_clipping():
    cfg = OptimConfig(name="rgd", warmup_steps=2, clip_norm=0.5, resonance_warmup=3)
    tx, schedule = make_optimizer(cfg, 1e-3, 20)
    manual = optax.chain(
        optax.clip_by_global_norm(0.5),
        rgd(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            resonance_strength=cfg.resonance_strength,
            resonance_warmup=3,
            mask=decay_mask,
        ),
    )
    params = {"kernel": jnp.ones((3, 4)) + jnp.arange(4.0), "scale": jnp.ones((4,))}
    grads = {"kernel": jnp.full((3, 4), 10.0) + jnp.arange(3.0)[:, None], "scale": jnp.ones((4,))}
    s1, s2 = tx.init(params), manual.init(params)
    for _ in range(3):
        u1, s1 = tx.update(grads, s1, params)
        u2, s2 = manual.update(grads, s2, params)
        for k in params:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-6, atol=1e-12)
    assert float(jnp.abs(u1["kernel"]).max()) > 0
    with pytest.raises(ConfigError):
        OptimConfig(name="sgd")
    with pytest.raises(ConfigError):
        OptimConfig(name="rgd", resonance_strength=1.5)
