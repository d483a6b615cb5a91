"""QLLM against the original PyTorch code's golden outputs (shared/fixtures/qllm/README.md).

Files are selected by pattern (``qllm_*_T*.npz`` forward files, ``qllm_generate*.npz``), so
another fixture set in the same layout is checked by the same tests. Every stored
intermediate, logits and loss is compared in float32 (rtol 1e-4, atol 1e-5) and against the
``f64/`` reruns in float64 (rtol 1e-7, atol 1e-9), the README's tolerances; every failing key
is reported. Generated ids must match exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_failures, fixture_files
from parity_log import each_fixture, record

from qpf.models.qllm import QLLM, QLLMConfig
from qpf.models.qllm_compat import (
    config_from_kwargs,
    fixed_sampling,
    generate_windowed,
    params_from_torch,
    upstream_filter,
    upstream_penalty,
)
from qpf.ops import losses
from qpf.ops.sampling import apply_repetition_penalty, filter_logits, presence_from_tokens

TOL = {"f32": {"rtol": 1e-4, "atol": 1e-5}, "f64": {"rtol": 1e-7, "atol": 1e-9}}
NOT_OUTPUTS = ("config_json", "meta_json", "input_ids", "target_ids")
INPUTS = ("gen/prompt_ids", "sampler/recent_ids")  # generate-file inputs, not outputs
BLOCK_KEYS = (
    "block_in", "ln1", "q", "k", "v", "q_base", "attn_weights", "attn_ctx", "attn_out",
    "h_mid", "ln2", "mlp_hidden", "block_out",
)  # fmt: skip


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def build(z: dict[str, np.ndarray], mode: str) -> tuple[QLLM, dict]:
    """The fixture's model and params, in float32 or (inside x64) float64."""
    kwargs = json.loads(str(z["config_json"]))["kwargs"]
    dt = "float64" if mode == "f64" else "float32"
    cfg = config_from_kwargs(kwargs, dtype=dt, param_dtype=dt)
    sd = {k[len("param/") :]: v for k, v in z.items() if k.startswith("param/")}
    return QLLM(cfg), params_from_torch(sd, cfg, np.float64 if mode == "f64" else np.float32)


def forward_outputs(z: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Every quantity a forward fixture stores, computed by qpf, under the fixture's keys."""
    model, params = build(z, mode)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
    out, inter = apply(params, jnp.asarray(z["input_ids"]))
    inter = inter["intermediates"]
    got = {k: np.asarray(inter[k][0]) for k in ("x_embed", "x_phase", "final_ln")}
    for key in BLOCK_KEYS:
        got[key] = np.stack(
            [np.asarray(inter[f"blocks_{i}"][key][0]) for i in range(model.config.num_layers)]
        )
    got["logits"] = np.asarray(out.logits)
    targets = jnp.asarray(z["target_ids"])
    ce_sum, count = losses.token_cross_entropy(out.logits, targets, jnp.ones(targets.shape))
    got["loss/ce"] = np.asarray(ce_sum / count)
    got["loss/phase_coherence"] = np.asarray(out.coupling_loss)
    got["loss/total"] = got["loss/ce"] + 0.1 * got["loss/phase_coherence"]
    return got


def compare(
    z: dict[str, np.ndarray], got: dict[str, np.ndarray], mode: str
) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """(failures, {key: (max abs err, max rel err)}) over every stored output of ``mode``."""
    prefix = "f64/" if mode == "f64" else ""
    keys = [
        k
        for k in z
        if not k.startswith("param/")
        and k not in NOT_OUTPUTS
        and (k.startswith("f64/") == (mode == "f64"))
    ]
    failures, errors = [], {}
    for key in keys:
        name = key[len(prefix) :]
        if name not in got:
            failures.append(f"{key}: stored but not computed by the port")
            continue
        record(key, got[name], z[key])
        ref, val = z[key].astype(np.float64), got[name].astype(np.float64)
        if ref.shape != val.shape:
            failures.append(f"{key}: shape {val.shape} != {ref.shape}")
            continue
        err = np.where(np.isnan(ref) & np.isnan(val), 0.0, np.abs(val - ref))
        errors[key] = (float(err.max()), float((err / np.maximum(np.abs(ref), 1e-30)).max()))
        if not np.allclose(val, ref, equal_nan=True, **TOL[mode]):
            failures.append(f"{key}: max abs {errors[key][0]:.3e}, max rel {errors[key][1]:.3e}")
    return failures, errors


def forward_files() -> list[Path]:
    return fixture_files("qllm", "qllm_*_T*.npz")


@pytest.fixture(params=["f32", "f64"])
def mode(request: pytest.FixtureRequest) -> str:
    """The parity mode; "f64" runs the test body with float64 enabled."""
    if request.param == "f64":
        request.getfixturevalue("x64")
    return request.param


@pytest.mark.parity
def test_forward_parity(mode: str) -> None:
    """Every intermediate, the logits and the losses of every forward fixture file."""
    failures = fixture_failures(
        "qllm", "qllm_*_T*.npz", lambda z: compare(z, forward_outputs(z, mode), mode)[0]
    )
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------ generation


def generate_outputs(z: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Greedy / penalised windowed generation and the sampler cases, as the file stores them."""
    model, params = build(z, mode)
    meta = json.loads(str(z["meta_json"]))
    got: dict[str, np.ndarray] = {}
    prompt = [int(i) for i in z["gen/prompt_ids"]]
    for run, rp in (("greedy", 1.0), ("penalized", 1.1)):
        pick = lambda lg, rec, _s, rp=rp: jnp.argmax(upstream_penalty(lg, rec, rp), -1)  # noqa: E731
        ids, steps = generate_windowed(model, params, prompt, meta["generation"]["max_new"], pick)
        got[f"gen/{run}/ids"] = np.asarray(ids)
        got[f"gen/{run}/step_logits"] = steps
        window = model.config.max_len
        # The recent window of step i: the last 64 of the ids before that step's choice.
        # (ids >= V pad the early, shorter windows; the penalty's scatter drops them).
        pad = model.config.vocab_size
        recent = np.stack(
            [np.asarray(([pad] * 64 + ids[: window + i])[-64:]) for i in range(len(steps))]
        )
        penalise = jax.jit(lambda lg, rec, rp=rp: upstream_penalty(lg, rec, rp))
        got[f"gen/{run}/step_logits_penalized"] = np.asarray(penalise(steps, recent))
        got[f"gen/{run}/text"] = np.asarray(bytes(i % 256 for i in ids).decode("utf-8", "ignore"))
    recent = jnp.asarray(z["sampler/recent_ids"])[None]
    last = jax.jit(lambda p, x: model.apply({"params": p}, x).logits[:, -1])(params, recent)
    for case, knobs in meta["sampler_cases"].items():
        knobs = dict(knobs)
        scale = knobs.pop("logit_scale")
        got[f"sampler/{case}/logits_in"] = np.asarray(last * scale)
        # The filter reads the stored logits so probs are checked on their own.
        logits_in = jnp.asarray(z[f"{'f64/' if mode == 'f64' else ''}sampler/{case}/logits_in"])
        filt = jax.jit(lambda lg, rec, knobs=knobs: upstream_filter(lg, rec, **knobs)[1])
        got[f"sampler/{case}/probs"] = np.asarray(filt(logits_in, recent))
    return got


@pytest.mark.parity
def test_generate_parity(mode: str) -> None:
    """Windowed greedy and penalised generation (ids exact, step logits) and sampler probs."""
    failures = []
    for path in each_fixture(fixture_files("qllm", "qllm_generate*.npz")):
        z = load(path)
        got = generate_outputs(z, mode)
        exact = [k for k in z if k.endswith(("/ids", "/text", "/error")) and k not in INPUTS]
        for key in exact:
            if key.endswith("/error"):
                raised = bool(np.isnan(got[key.replace("/error", "/probs")]).all())
                record(key, raised, True, note="upstream raised: the port's probs must be NaN")
                if not raised:
                    failures.append(f"{path.name} {key}: upstream raised, the port did not")
                continue
            record(key, got[key], z[key])
            if not np.array_equal(got[key], z[key]):
                failures.append(f"{path.name} {key}: {got[key]} != {z[key]}")
        numeric = {k: v for k, v in z.items() if k not in exact and k not in INPUTS}
        fails, _ = compare(numeric, got, mode)
        failures += [f"{path.name} {f}" for f in fails]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------- fixed sampler, loader


def test_fixed_sampler_repairs_upstream_bugs() -> None:
    """On the fixture's sampler cases the shared sampler never empties the distribution
    (relative min-p) and never raises a negative logit of a repeated id."""
    z = load(fixture_files("qllm", "qllm_generate*.npz")[0])
    recent = jnp.asarray(z["sampler/recent_ids"])[None]
    logits = jnp.asarray(z["sampler/minp_all_removed/logits_in"])
    knobs = dict(temperature=1.0, top_k=0, top_p=0.0, repetition_penalty=1.0, min_p=0.05)
    _, upstream = jax.jit(lambda lg, r: upstream_filter(lg, r, **knobs))(logits, recent)
    assert np.isnan(np.asarray(upstream)).all()
    cfg = fixed_sampling(1.0, 0, 0.0, 1.0, 0.05)
    kept = np.isfinite(np.asarray(jax.jit(lambda lg: filter_logits(lg, cfg))(logits)))
    probs = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_array_equal(kept, probs >= 0.05 * probs.max(-1, keepdims=True))
    assert kept.sum() >= 1  # relative min-p always keeps the most likely token
    # A repeated id with a negative logit: upstream boosts it, the fix lowers it.
    neg = jnp.full((1, 256), -2.0).at[0, 7].set(-1.0)
    ids = jnp.asarray([[7, 7, 7]])
    boosted = upstream_penalty(neg, ids, 1.1)[0, 7]
    assert boosted > -1.0
    pres = presence_from_tokens(ids, 256)
    assert float(apply_repetition_penalty(neg, pres, 1.1)[0, 7]) < -1.0
    assert fixed_sampling(0.7, 50, 0.0, 1.1, 0.05).top_p == 1.0  # upstream: top_p 0 is off


def test_loader_rejects_unused_and_misshapen_keys() -> None:
    z = load(forward_files()[0])
    kwargs = json.loads(str(z["config_json"]))["kwargs"]
    cfg = config_from_kwargs(kwargs)
    sd = {k[len("param/") :]: v for k, v in z.items() if k.startswith("param/")}
    with pytest.raises(ValueError, match="not used"):
        params_from_torch({**sd, "extra.weight": np.zeros(3)}, cfg)
    bad = dict(sd)
    bad["head.weight"] = np.zeros((7, cfg.dim), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        params_from_torch(bad, cfg)
    with pytest.raises(ValueError, match="unknown"):
        config_from_kwargs({**kwargs, "bogus": 1})
    assert isinstance(cfg, QLLMConfig)
    assert cfg.vocab_size == 256
