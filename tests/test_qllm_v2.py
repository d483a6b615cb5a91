"""qllm_v2 model: parity with the original PyTorch code (golden fixtures), causal mode's
causality / decode / gradients, faithful mode's leaks, branch choice under jit, presets."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_files

from qpf.models.qllm_v2 import (
    Processor,
    QLLMv2,
    QLLMv2Config,
    original_param_count,
)
from qpf.models.qllm_v2_losses import (
    coherence_per_sample,
    concept_codes,
    concept_loss,
    energy_per_sample,
    phase_angles,
    semantic_loss,
)
from qpf.models.qllm_v2_torch import config_from_torch, params_from_torch
from qpf.ops import qllm_v2 as ops

F32_TOL = {"rtol": 1e-4, "atol": 1e-5}  # fixtures README, float32 end to end
F64_TOL = {"rtol": 1e-9, "atol": 1e-11}  # fixtures README, float64 against f64/<key>
CASES = ("T16/", "T24/")
BRANCHES = ("lowvar", "level0", *(f"level{i}" for i in range(1, 10)), "capped")


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _model(z: dict, dtype: str) -> tuple[QLLMv2, QLLMv2Config, dict]:
    kwargs = json.loads(str(z["config_json"]))["kwargs"]
    cfg = config_from_torch(kwargs, dtype=dtype, param_dtype=dtype)
    state_dict = {k.removeprefix("param/"): v for k, v in z.items() if k.startswith("param/")}
    return QLLMv2(cfg), cfg, params_from_torch(state_dict, cfg, np.dtype(dtype))


def _compare(got: dict, z: dict, prefix: str, tol: dict, failures: list[str]) -> int:
    checked = 0
    for key, value in got.items():
        ref_key = prefix + key
        if ref_key not in z:
            continue
        ref, value = z[ref_key], np.asarray(value)
        checked += 1
        if ref.shape != value.shape:
            failures.append(f"{ref_key}: shape {value.shape} != {ref.shape}")
        elif not np.allclose(value, ref, **tol):
            failures.append(f"{ref_key}: max abs err {np.max(np.abs(value - ref)):.3g}")
    return checked


def _forward_keys(model: QLLMv2, params: dict, z: dict, case: str) -> dict:
    ids = jnp.asarray(z[case + "input_ids"])
    targets = jnp.asarray(z[case + "targets"])
    out = model.apply(params, ids, return_intermediates=True)
    got = {case + k: v for k, v in out.intermediates.items()}
    got[case + "logits"] = out.logits
    amp, phase = model.apply(params, ids, method=QLLMv2.phase_representation)
    got[case + "phase_repr"] = jnp.stack([amp * jnp.cos(phase), amp * jnp.sin(phase)], -1)
    theta = phase_angles(amp, phase, wrap=False)
    # The random position draws are the original's own (stored int32 keys).
    e_perm = jnp.asarray(z[case + "loss/energy_perm"])
    c_perm = jnp.asarray(z[case + "loss/coherence_perm"])
    got[case + "loss/energy_per_sample"] = energy_per_sample(theta, e_perm)
    got[case + "loss/coherence_per_sample"] = coherence_per_sample(theta, c_perm, wrap=False)
    got[case + "loss/semantic"] = semantic_loss(out.logits, targets)
    got[case + "loss/concept"] = concept_loss(concept_codes(params, ids))
    logp = jax.nn.log_softmax(out.logits, -1)
    got[case + "loss/ce"] = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    return got


def _branch_keys(cfg: QLLMv2Config, params: dict, z: dict, dtype: str) -> dict:
    """Every processor branch of every layer, on the stored inputs (under jit)."""
    got = {}
    for layer in range(cfg.num_layers):
        sub = {"params": params["params"][f"quantum_layers_{layer}"]}
        for name in BRANCHES:
            key = f"branches/layer{layer}/{name}/"
            x = jnp.asarray(z[key + "input"], dtype)
            out, kappa, level = jax.jit(Processor(cfg).apply)(sub, x)
            got.update({key + "output": out, key + "kappa": kappa, key + "level": level})
    return got


def _evolve_keys(z: dict, prefix: str, dtype: str) -> dict:
    """The evolve step with the original's own random draws (float64 has its own)."""
    got = {}
    for step in (100, 2500):
        key = f"evolve/step{step}/"
        got[key + "output"] = ops.evolve_quantum_state(
            jnp.asarray(z["evolve/input"], dtype),
            jnp.asarray(step),
            jnp.asarray(z["param/quantum_uncertainty"], dtype),
            jnp.asarray(z[prefix + key + "draw_noise"], dtype),
            jnp.asarray(z[prefix + key + "draw_mix"], dtype),
            jnp.asarray(z[prefix + key + "draw_uniform"], dtype),
            causal=False,
        )
    return got


def _parity(path, dtype: str) -> None:
    z = _load(path)
    prefix = "f64/" if dtype == "float64" else ""
    tol = F64_TOL if dtype == "float64" else F32_TOL
    model, cfg, params = _model(z, dtype)
    failures: list[str] = []
    checked = 0
    for case in CASES:
        got = _forward_keys(model, params, z, case)
        checked += _compare(got, z, prefix, tol, failures)
    checked += _compare(_branch_keys(cfg, params, z, dtype), z, prefix, tol, failures)
    checked += _compare(_evolve_keys(z, prefix, dtype), z, prefix, tol, failures)
    assert checked >= 100, f"only {checked} keys compared"
    assert not failures, f"{len(failures)} of {checked} keys differ:\n" + "\n".join(failures)


@pytest.mark.parametrize("path", fixture_files("v2", "v2_*.npz"), ids=lambda p: p.stem)
def test_parity_float32(path) -> None:
    _parity(path, "float32")


@pytest.mark.parametrize("path", fixture_files("v2", "v2_*.npz"), ids=lambda p: p.stem)
def test_parity_float64(path, x64) -> None:
    _parity(path, "float64")


@pytest.mark.parametrize("path", fixture_files("v2", "v2_*.npz"), ids=lambda p: p.stem)
def test_parity_param_count_and_loader_layout(path) -> None:
    z = _load(path)
    model, cfg, params = _model(z, "float32")
    meta = json.loads(str(z["meta_json"]))
    assert original_param_count(cfg, params) == meta["n_params"]
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    assert jax.tree.structure(init) == jax.tree.structure(params)
    shapes = jax.tree.map(lambda a, b: a.shape == b.shape, init, params)
    assert all(jax.tree.leaves(shapes))
