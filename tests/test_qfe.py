"""QFE loss: parity with the original's values and gradients, projection variant, finiteness.

Fixtures (pattern-selected): ``qfe_loss*.npz`` (fixed logits, two lengths, two λ) and the
``loss/qfe/*`` keys of the full-model files, evaluated on their stored logits. Tolerances
(fixture README): float32 rtol 1e-4 / atol 1e-5. Float64: the original builds its one-hot
target spectrum in complex64 even in its float64 run, so a pure-float64 QFE differs from
``f64/`` by <= 8.5e-9 on the coherence; README recommendation: rtol 1e-7 / atol 1e-9.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from conftest import fixture_failures
from parity_log import record

from qpf.training import qfe

F32 = {"rtol": 1e-4, "atol": 1e-5}
F64 = {"rtol": 1e-7, "atol": 1e-9}


def load(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@jax.jit
def _qfe_all(logits, targets, lam):
    out = dict(qfe.qfe_loss(logits, targets, lam))
    out["grad_total_wrt_logits"] = jax.grad(lambda x: qfe.qfe_loss(x, targets, lam)["total"])(
        logits
    )
    out["grad_coherence_wrt_logits"] = jax.grad(lambda x: qfe.spectral_coherence(x, targets))(
        logits
    )
    return out


def qfe_outputs(logits, targets, lam: float) -> dict[str, np.ndarray]:
    out = _qfe_all(jnp.asarray(logits), jnp.asarray(targets), lam)
    return {k: np.asarray(v) for k, v in out.items()}


def check(got: dict, z: dict, prefix: str, f64: bool) -> list[str]:
    failures = []
    tol = F64 if f64 else F32
    for name, value in got.items():
        key = f"{'f64/' if f64 else ''}{prefix}/{name}"
        record(key, value, z[key])
        if not np.allclose(value, z[key], **tol):
            failures.append(f"{key}: max abs err {np.max(np.abs(value - z[key])):.3g}")
    return failures


def test_qfe_parity_loss_fixture(parity_dtype):
    f64 = parity_dtype == "float64"

    def failures_of(z: dict) -> list[str]:
        variants = json.loads(str(z["config_json"]))["call"]["variants"]
        failures = []
        for t_key in sorted({k.split("/")[0] for k in z if k.startswith("T")}):
            logits = z[f"{t_key}/logits"].astype(parity_dtype)
            for name, var in variants.items():
                got = qfe_outputs(logits, z[f"{t_key}/targets"], var["lambda_coherence"])
                failures += check(got, z, f"{t_key}/{name}", f64)
        return failures

    failures = fixture_failures("wavegpt", "qfe_loss*.npz", failures_of)
    assert not failures, "\n".join(failures)


def test_qfe_parity_model_fixtures(parity_dtype):
    """The loss/qfe keys of the full-model files, from their stored logits."""
    f64 = parity_dtype == "float64"

    def failures_of(z: dict) -> list[str]:
        if "loss/qfe/total" not in z:
            return []
        lam = json.loads(str(z["config_json"]))["call"]["qfe"]["lambda_coherence"]
        logits = z["f64/logits"] if f64 else z["logits"]
        got = qfe_outputs(logits, z["targets"], lam)
        return check({k: v for k, v in got.items() if f"loss/qfe/{k}" in z}, z, "loss/qfe", f64)

    failures = fixture_failures("wavegpt", "wavegpt_*_T*.npz", failures_of)
    assert not failures, "\n".join(failures)


def test_projection_with_identity_equals_one_hot_and_sliced_gradient():
    logits = 2.0 * jax.random.normal(jax.random.key(0), (2, 11, 7))
    targets = jax.random.randint(jax.random.key(1), (2, 11), 0, 7)
    one_hot = qfe.spectral_coherence(logits, targets)
    projected = qfe.spectral_coherence(logits, targets, projection=jnp.eye(7))
    np.testing.assert_allclose(projected, one_hot, rtol=1e-6)
    r = qfe.qfe_projection(300)
    assert r.shape == (300, 256)
    np.testing.assert_allclose(jnp.std(r), 1 / 16, rtol=0.02)


def test_coherence_zero_for_perfect_prediction_and_finite_gradients():
    targets = jnp.array([[1, 2, 1, 2, 0, 3, 0, 3]])
    perfect = 30.0 * jax.nn.one_hot(targets, 5)
    assert float(qfe.spectral_coherence(perfect, targets)) < 1e-6
    flat = jnp.zeros((1, 8, 5))  # constant probabilities: exact zeros in the spectrum
    grad = jax.grad(lambda x: qfe.spectral_coherence(x, targets))(flat)
    assert np.isfinite(np.asarray(grad)).all()
    masked = qfe.spectral_coherence(perfect, targets, mask=jnp.arange(8)[None] < 4)
    assert np.isfinite(float(masked))
