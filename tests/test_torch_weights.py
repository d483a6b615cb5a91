"""Golden parity of the whole model against the original PyTorch v4 outputs.

Fixture files come from ``QPF_V4_GOLDEN`` (paths or globs separated by ``os.pathsep``),
default ``shared/fixtures/v4_golden_*.npz``; their format is described in
``shared/fixtures/README.md``. Every key of a fixture is checked, except the ones listed in
``NOT_REPRODUCED`` with the reason.

Tolerances (fixture README, "Tolerances"): float64 against the ``f64/`` references at
rtol 1e-10 / atol 1e-12 (achieved ~1e-13; the README allows 1e-6). Float32 end to end:
rtol 1e-4 / atol 1e-5, except for the tensors behind three Phase2DLayerNorms (the backbone
output and everything summed onto it, and the logits), whose float32 rounding noise is
amplified by the norm's 1/|x| for near-zero elements: the upstream float32 run is itself
up to 9.3e-5 from its own float64 truth there, and an independent float32 port adds noise
of the same size, so the README prescribes atol 5e-4 for them. Stage-wise float32 (each
stage fed the stored float32
input of that stage) meets rtol 1e-4 / atol 1e-5 everywhere.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import parity
import pytest
from conftest import golden_patterns, require_shared
from parity_log import name_fixture, record

from qpf.layers.coupler import coupling_loss
from qpf.models import QPFModel
from qpf.models import torch_weights as tw
from qpf.ops import losses
from qpf.ops import phase2d as p2d

# Fixture keys that qpf deliberately does not reproduce, with the reason.
NOT_REPRODUCED = {
    "backbone_state": "the original advances its final SSM state through zero padding when "
    "T > 128 and T % 128 != 0 (bug 22.3); qpf returns the exact state, checked against "
    "backbone_state_exact",
}
LOOSE_F32 = {"backbone_out", "phase_states", "episodic_input", "logits"}
LOSS_WEIGHTS = {"ce": 1.0, "coherence": 0.01, "coupling": 0.1}  # the fixture's objectives


def open_golden(path: str | None) -> dict[str, np.ndarray]:
    if path is None:
        require_shared()
        pytest.fail(f"no golden fixture matches {golden_patterns()} (set QPF_V4_GOLDEN)")
    name_fixture(Path(path).name)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def torch_layout(x) -> np.ndarray:
    return np.asarray(p2d.to_torch_layout(x))


def model_outputs(z: dict, dtype: str) -> dict[str, np.ndarray]:
    """Run qpf on the fixture's ids with its weights; every comparable key, torch layout."""
    config, params = tw.load_golden(z, dtype)
    out = QPFModel(config).apply(
        {"params": params}, jnp.asarray(z["input_ids"]), return_intermediates=True
    )
    got = {k: torch_layout(v) for k, v in out.intermediates.items() if k != "embed"}
    got["embed"] = torch_layout(out.intermediates["embed"])
    got["memory_topk_indices"] = np.asarray(out.intermediates["memory_topk_indices"])
    got["memory_topk_weights"] = np.asarray(out.intermediates["memory_topk_weights"])
    got["logits"] = np.asarray(out.logits)
    got["backbone_state_exact"] = torch_layout(out.state["backbone"])
    got["coupling_loss"] = np.asarray(out.coupling_loss)
    got.update(loss_terms(out.logits, out.phase_states, out.coupling_loss, z["input_ids"]))
    return got


def loss_terms(logits, phase_states, coupling, ids) -> dict[str, np.ndarray]:
    ce, count = losses.next_token_ce(logits, jnp.asarray(ids))
    terms = {
        "ce": ce,
        "coherence": losses.coherence_loss(phase_states),
        "coupling": coupling,
    }
    total = sum(LOSS_WEIGHTS[k] * v for k, v in terms.items())
    out = {f"loss/{k}": np.asarray(v) for k, v in terms.items()}
    out["loss/total"] = np.asarray(total)
    out["_token_count"] = np.asarray(count)
    return out


def fixture_keys(z: dict, prefix: str) -> set[str]:
    """Output keys of a fixture under ``prefix`` ('' for float32, 'f64/' for float64)."""
    skip = {"config_json", "meta_json", "input_ids", *NOT_REPRODUCED}
    names = set()
    for key in z:
        if key.startswith("param/") or not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if prefix == "" and name.startswith("f64/"):
            continue
        names.add(name)
    return names - skip


def compare(z: dict, got: dict, prefix: str, tol: Callable[[str], tuple[float, float]]) -> None:
    """Check every output key of the fixture under ``prefix``; report all failing keys."""
    names = fixture_keys(z, prefix)
    failures = [f"fixture key qpf does not produce: {k}" for k in sorted(names - set(got))]
    for name in sorted(names & set(got)):
        ref, ours = z[prefix + name], got[name]
        if name == "memory_topk_indices":
            continue  # checked with the weights as one top-k selection below
        if name == "memory_topk_weights" and "memory_topk_indices" in z:
            # The f64/ references hold no indices: float64 ranks match the float32 ones.
            rtol, atol = tol(name)
            failures += parity.topk(
                "memory_topk", got["memory_topk_indices"], z["memory_topk_indices"], ours, ref,
                rtol, atol,
            )  # fmt: skip
        elif name.startswith("loss/") and np.isnan(ref):
            # The original averages over an empty set at T=1 and returns NaN; qpf returns 0
            # with a token count of 0 (documented in qpf.ops.losses).
            record(
                name, ours, ref, note="reference NaN (no targets); qpf returns 0", deviation=True
            )
            if got["_token_count"] != 0 or np.isnan(ours):
                failures.append(f"{name}: reference NaN (no targets) but qpf gave {ours}")
        elif np.issubdtype(ref.dtype, np.integer):
            failures += parity.close(name, ours, ref, 0.0, 0.0)
        else:
            failures += parity.close(name, ours, ref, *tol(name))
    parity.report(failures)


def test_parity_golden_patterns_each_match_a_file():
    patterns = golden_patterns()
    if not patterns:
        require_shared()
    for pattern in patterns:
        assert glob.glob(pattern), f"QPF_V4_GOLDEN pattern {pattern!r} matches no file"


def test_v4_golden_parity_float64(golden_path, x64):
    z = open_golden(golden_path)
    got = model_outputs(z, "float64")
    # Achieved error ~1e-13: 1e-10 leaves a margin yet fails when an epsilon moves by 1e-8.
    compare(z, got, "f64/", lambda name: (1e-10, 1e-12))


def test_v4_golden_parity_float32_end_to_end(golden_path):
    z = open_golden(golden_path)
    with parity.float32_matmuls():
        got = model_outputs(z, "float32")
    compare(z, got, "", lambda name: (1e-4, 5e-4) if name in LOOSE_F32 else (1e-4, 1e-5))


def test_v4_golden_parity_float32_stagewise(golden_path):
    """Each stage fed the stored float32 input of that stage meets rtol 1e-4 / atol 1e-5."""
    z = open_golden(golden_path)
    with parity.float32_matmuls():
        parity.report(stagewise_failures(z))


def stagewise_failures(z: dict) -> list[str]:
    config, params = tw.load_golden(z, "float32")
    model, variables = QPFModel(config), {"params": params}
    planar = lambda key: p2d.from_torch_layout(jnp.asarray(z[key]))  # noqa: E731
    failures: list[str] = []
    check = lambda got, key: failures.extend(parity.close(key, got, z[key], 1e-4, 1e-5))  # noqa: E731

    def run(fn, *args):
        return model.apply(variables, *args, method=fn)

    for name in config.bank_names:
        y, _ = run(lambda m, x, n=name: m.banks[n](x), planar("embed"))
        check(torch_layout(y), f"bank/{name}")
    banks = {n: planar(f"bank/{n}") for n in config.bank_names}
    check(torch_layout(run(lambda m, b: m.coupler(b), banks)), "coupled")
    y, state = run(lambda m, x: m.backbone(x), planar("coupled"))
    check(torch_layout(y), "backbone_out")
    check(torch_layout(state), "backbone_state_exact")
    values, _ = run(lambda m, x: m.memory(x), planar("backbone_out"))
    check(torch_layout(values), "memory_values")
    values, _ = run(lambda m, x: m.episodic(x, None, 0), planar("episodic_input"))
    check(torch_layout(values), "episodic_values")
    head = lambda m, h: m.output_proj(p2d.to_concat(m.head_norm(m.head_proj(h))))  # noqa: E731
    check(run(head, planar("phase_states")), "logits")
    coupling = coupling_loss([banks[n] for n in config.bank_names])
    terms = loss_terms(jnp.asarray(z["logits"]), planar("phase_states"), coupling, z["input_ids"])
    check(np.asarray(coupling), "coupling_loss")
    for key in ("loss/coherence", "loss/coupling"):
        check(terms[key], key)
    if not np.isnan(z["loss/ce"]):
        check(terms["loss/ce"], "loss/ce")
        check(terms["loss/total"], "loss/total")
    return failures


def test_golden_config_maps_to_a_faithful_qpf_config(golden_path):
    z = open_golden(golden_path)
    config = tw.config_from_torch(json.loads(str(z["config_json"])))
    assert config.bank_names == ("semantic", "context")
    assert config.episodic.regime == "original"
    assert config.memory.top_k == 32
    assert config.coupler.dynamic_routing


def test_interleaved_to_concat_permutes_a_map_correctly():
    rng = np.random.default_rng(0)
    d = 5
    w = rng.normal(size=(2 * d, 2 * d))
    x = rng.normal(size=(3, 2, d))  # planar
    interleaved = np.swapaxes(x, -1, -2).reshape(3, 2 * d)
    y_torch = interleaved @ w.T  # torch Linear on the interleaved layout
    y_ours = x.reshape(3, 2 * d) @ tw.interleaved_to_concat(w)  # concat layout
    np.testing.assert_allclose(
        np.swapaxes(y_ours.reshape(3, 2, d), -1, -2).reshape(3, 2 * d), y_torch, rtol=1e-12
    )


def test_unknown_torch_parameters_are_an_error():
    sd = tw.StateDict({"memory.slot_importance": np.zeros(3), "mystery.weight": np.zeros(2)})
    with pytest.raises(ValueError, match=r"mystery\.weight"):
        sd.check_all_used()


def test_topk_comparison_accepts_near_tie_swaps_and_fails_on_another_selection():
    ref_idx = np.array([[[4, 1, 7], [2, 0, 5]]])
    ref_w = np.array([[[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]]])
    swapped_idx = ref_idx[..., [0, 2, 1]]  # ranks 2 and 3 swapped, same slot weights
    swapped_w = ref_w[..., [0, 2, 1]]
    assert parity.topk("k", swapped_idx, ref_idx, swapped_w, ref_w, 1e-6, 0.0) == []
    other = ref_idx.copy()
    other[0, 1, 2] = 6  # slot 6 selected instead of 5
    failures = parity.topk("k", other, ref_idx, ref_w, ref_w, 1e-6, 0.0)
    assert failures == ["k: 1 queries select other slots; first at (0, 1): [0, 2, 6] vs [0, 2, 5]"]
    wrong_w = swapped_w.copy()
    wrong_w[0, 0, 0] += 1e-3  # the weight of slot 4 moved
    assert parity.topk("k", swapped_idx, ref_idx, wrong_w, ref_w, 1e-6, 0.0)[0].startswith(
        "k weights (rank-aligned): 1/6 entries off"
    )


def test_compare_reports_every_failing_key():
    z = {"a": np.ones(3), "b": np.zeros(2), "c": np.ones(1)}
    got = {"a": np.ones(3) * 2, "b": np.ones(2), "c": np.ones(1)}
    with pytest.raises(AssertionError, match=r"2 parity failures:\na: .*\nb: "):
        compare(z, got, "", lambda name: (1e-6, 0.0))
