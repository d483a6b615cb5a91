"""qllm_v3 faithful mode against the original PyTorch v3 golden fixtures.

Files come from ``fixture_files('v3', ...)`` (``QPF_FIXTURES_DIR``, default
``../shared/fixtures``). Each call's intermediates, logits and the persistent state before
and after the call are compared; float32 at rtol 1e-4 / atol 1e-5 and float64 against the
``f64/`` copies at rtol 1e-9 / atol 1e-11 (the README's recommendations); integer
decisions (spikes, refractory mask, DP branch) must match exactly. Every failing key is
collected and reported in one assertion.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from parity_log import each_fixture, record

from qpf.models.qllm_v3 import QLLMv3, consciousness_weights
from qpf.models.qllm_v3_weights import config_from_kwargs, load_torch_state_dict
from qpf.ops import v3_ops as ops
from tests.conftest import fixture_files

TOL = {"float32": (1e-4, 1e-5), "float64": (1e-9, 1e-11)}
INT_KEYS = ("spikes", "refractory_mask", "branch")
# Keys the model sows per call, in the fixtures' names.
CALL_KEYS = (
    "embed",
    "consciousness/states",
    "consciousness/norm",
    "consciousness/out",
)
LAYER_KEYS = (
    "stm_in",
    "stm_gate_logits",
    "stm_out",
    "ltm_out",
    "synaptic",
    "spike_out",
    "spikes",
    "refractory_mask",
    "dp_kappa",
    "branch",
    "dp_out",
)
SPIKING_STATE = ("membrane_potential", "spike_history")


class Checker:
    """Collects mismatches against a fixture file in one dtype."""

    def __init__(self, z: dict[str, np.ndarray], dtype: str):
        self.z, self.dtype, self.failures = z, dtype, []
        self.rtol, self.atol = TOL[dtype]

    def stored_key(self, key: str) -> str:
        """The fixture key ``key`` is checked against (its f64/ copy in a float64 run)."""
        is_int = key.rsplit("/", 1)[-1] in INT_KEYS or key == "fwd1/consolidated"
        if self.dtype == "float64" and not is_int and f"f64/{key}" in self.z:
            return f"f64/{key}"
        return key

    def expected(self, key: str) -> np.ndarray | None:
        return self.z.get(self.stored_key(key))

    def check(self, key: str, got) -> None:
        want = self.expected(key)
        if want is None:
            self.failures.append(f"{key}: missing in fixture")
            return
        got = np.asarray(got)
        record(self.stored_key(key), got, want)
        if got.shape != want.shape:
            self.failures.append(f"{key}: shape {got.shape} vs {want.shape}")
            return
        if want.dtype.kind in "iub":
            if not np.array_equal(got.astype(want.dtype), want):
                self.failures.append(f"{key}: {int(np.sum(got != want))} entries differ")
            return
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        bad = err > self.atol + self.rtol * np.abs(want.astype(np.float64))
        if np.any(bad):
            self.failures.append(f"{key}: max abs err {err.max():.3g} ({int(bad.sum())} bad)")

    def report(self, name: str) -> None:
        assert not self.failures, f"{name} [{self.dtype}] failing keys:\n" + "\n".join(
            self.failures
        )


def load(path: Path, dtype: str):
    z = dict(np.load(path))
    kwargs = json.loads(str(z["config_json"]))["kwargs"]
    config = config_from_kwargs(kwargs, dtype=dtype, param_dtype=dtype)
    sd = {k.removeprefix("param/"): v for k, v in z.items() if k.startswith("param/")}
    variables = load_torch_state_dict(sd, config, dtype=np.dtype(dtype))
    variables = jax.tree.map(jnp.asarray, variables)
    return z, QLLMv3(config), variables


def make_apply(model: QLLMv3, train: bool, training_step: int | None):
    def apply(variables, ids):
        return model.apply(
            variables,
            ids,
            deterministic=not train,
            training_step=training_step,
            mutable=["state", "intermediates"],
        )

    return jax.jit(apply)


def check_call(chk: Checker, prefix: str, out, upd, num_layers: int) -> None:
    inter = {k: v[0] for k, v in upd["intermediates"].items()}
    for key in CALL_KEYS:
        if not (key == "embed" and chk.dtype == "float64"):  # no f64 copy of embed
            chk.check(prefix + key, inter[key])
    for i in range(num_layers):
        for key in LAYER_KEYS:
            chk.check(f"{prefix}layer/{i}/{key}", inter[f"layer/{i}/{key}"])
        if f"{prefix}layer/{i}/stm_slots_after" in chk.z:
            chk.check(f"{prefix}layer/{i}/stm_slots_after", inter[f"layer/{i}/stm_slots_after"])
    chk.check(prefix + "logits", out.logits)


def effective_state(variables, new_state) -> dict[str, np.ndarray]:
    """Torch-named persistent tensors (tables = param + written delta)."""
    p, s = variables["params"], new_state
    named = {}
    for name in SPIKING_STATE:
        for i, row in enumerate(np.asarray(s[name])):
            named[f"spiking_neurons.{i}.{name}"] = row
    for name in ("usage_count", "importance_scores"):
        for i, row in enumerate(np.asarray(s[name])):
            named[f"developmental_plasticity.{i}.{name}"] = row
    named["short_term_memory.memory_slots"] = np.asarray(
        p["short_term_memory"]["memory_slots"] + s["memory_slots_delta"]
    )
    named["long_term_memory.episodic_memory"] = np.asarray(
        p["long_term_memory"]["episodic_memory"] + s["episodic_memory_delta"]
    )
    named["long_term_memory.episodic_weights"] = np.asarray(s["episodic_weights"])
    return named


def check_state(chk: Checker, variables, state, prefix: str | None, keys) -> None:
    """prefix None: the state before the first call (the ``param/`` entries)."""
    named = effective_state(variables, state)
    for key in keys:
        if prefix is None:
            want = chk.z[f"param/{key}"]
            got = named[key]
            record(f"param/{key}", got, want, note="state before call 1")
            if not np.allclose(got, want, rtol=0, atol=0):
                chk.failures.append(f"state before call 1 {key}: differs from param/{key}")
        else:
            chk.check(f"{prefix}state_after/{key}", named[key])


def losses(chk: Checker, params, ids, targets, logits_c, logits_e) -> None:
    cw = consciousness_weights(params, ids)
    chk.check("consciousness_weights", cw)
    ce = ops.cross_entropy(logits_c, targets)
    if "loss/ce" in chk.z:
        chk.check("loss/ce", ce)
        chk.check("loss/ce_ignore0", ops.cross_entropy(logits_c, targets, ignore_index=0))
    closs = ops.consciousness_loss(ce, cw)
    chk.check("loss/consciousness", closs)
    errs = ops.local_errors(logits_e, targets)
    chk.check("local_errors", errs)
    if "loss/local_error_rate" in chk.z:
        chk.check("loss/local_error_rate", jnp.mean(errs))
    chk.check("loss/hybrid", ops.hybrid_loss(closs, errs))


def test_v3_golden_parity_eval_calls(parity_dtype):
    dtype = parity_dtype
    for path in each_fixture(fixture_files("v3", "v3_golden_T*.npz")):
        z, model, variables = load(path, dtype)
        chk = Checker(z, dtype)
        n = model.config.num_layers
        spiking_keys = [f"spiking_neurons.{i}.{k}" for i in range(n) for k in SPIKING_STATE]
        apply = make_apply(model, train=False, training_step=None)
        check_state(chk, variables, variables["state"], None, spiking_keys)
        first = None
        for c, ids_key in ((1, "input_ids"), (2, "input_ids"), (3, "input_ids_call3")):
            prefix = f"call{c}/"
            before = variables["state"]
            out, upd = apply(variables, jnp.asarray(z[ids_key]))
            if c > 1:  # the state before this call is the previous call's state after
                check_state(chk, variables, before, f"call{c - 1}/", spiking_keys)
            check_call(chk, prefix, out, upd, n)
            check_state(chk, variables, upd["state"], prefix, spiking_keys)
            variables = {"params": variables["params"], "state": upd["state"]}
            first = out.logits if first is None else first
        dp_branches(chk, model, variables)
        losses(chk, variables["params"], z["input_ids"], z["targets"], first, first)
        chk.report(path.name)


@jax.jit
def _dp(p, x):
    kappa = ops.dp_complexity(x)
    branch = ops.dp_branch(kappa)
    return kappa, branch, ops.dp_apply(p, x, branch)


def dp_branches(chk: Checker, model: QLLMv3, variables) -> None:
    names = json.loads(str(chk.z["config_json"]))["call"]["dp_branches"]["names"]
    for i in range(model.config.num_layers):
        p = variables["params"][f"developmental_plasticity_{i}"]
        for name in names:
            key = f"dp_branches/layer{i}/{name}/"
            x = jnp.asarray(chk.z[key + "input"], model.config.dtype)
            kappa, branch, out = _dp(p, x)
            chk.check(key + "kappa", kappa)
            chk.check(key + "branch", branch)
            chk.check(key + "output", out)


def test_v3_hybrid_step_parity_train_mode(parity_dtype):
    dtype = parity_dtype
    for path in each_fixture(fixture_files("v3", "v3_hybrid_step_T*.npz")):
        z, model, variables = load(path, dtype)
        chk = Checker(z, dtype)
        step = json.loads(str(z["config_json"]))["call"]["training_step"]
        n = model.config.num_layers
        all_keys = [
            k.removeprefix("fwd1/state_after/") for k in z if k.startswith("fwd1/state_after/")
        ]
        check_state(chk, variables, variables["state"], None, all_keys)
        ids = jnp.asarray(z["input_ids"])
        logits = {}
        for f, training_step in ((1, step), (2, None)):
            prefix = f"fwd{f}/"
            out, upd = make_apply(model, train=True, training_step=training_step)(variables, ids)
            check_call(chk, prefix, out, upd, n)
            check_state(chk, variables, upd["state"], prefix, all_keys)
            fired = upd["intermediates"].get("consolidated", (np.bool_(False),))[0]
            record(prefix + "consolidated", fired, chk.z[prefix + "consolidated"])
            if chk.z[prefix + "consolidated"] != np.asarray(fired):
                chk.failures.append(
                    f"{prefix}consolidated: {fired} vs {z[prefix + 'consolidated']}"
                )
            variables = {"params": variables["params"], "state": upd["state"]}
            logits[f] = out.logits
        losses(chk, variables["params"], z["input_ids"], z["targets"], logits[1], logits[2])
        consolidation_calls(chk, variables)
        chk.report(path.name)


def consolidation_calls(chk: Checker, variables) -> None:
    ltm = variables["params"]["long_term_memory"]
    table = ltm["episodic_memory"] + variables["state"]["episodic_memory_delta"]
    weights = variables["state"]["episodic_weights"]
    for c in (1, 2):
        key = f"consolidate/call{c}/"
        x = jnp.asarray(chk.z[key + "input"], table.dtype)
        imp = jnp.asarray(chk.z[key + "importance"], table.dtype)
        table, weights = ops.consolidate(ltm["consolidation_gate"], x, imp, table, weights)
        chk.check(key + "episodic_memory_after", table)
        chk.check(key + "episodic_weights_after", weights)
