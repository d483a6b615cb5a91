"""Phase banks: parity with the original module fixtures, per-row languages, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from conftest import load_fixture

from qpf import config as cfgs
from qpf.layers import banks
from qpf.models import torch_weights as tw
from qpf.ops import phase2d as p2d

FIXTURE_BANKS = {
    "language": (banks.LanguageBank, cfgs.LanguageBankConfig(num_languages=16, num_layers=2)),
    "emotion": (banks.EmotionBank, cfgs.EmotionBankConfig(num_emotions=8)),
    "morphology": (banks.MorphologyBank, cfgs.MorphologyBankConfig(num_patterns=128)),
    "orthography": (banks.OrthographyBank, cfgs.OrthographyBankConfig()),
}


def fixture_bank(name: str):
    z = load_fixture(f"bank_{name}.npz")
    cls, cfg = FIXTURE_BANKS[name]
    sd = tw.StateDict(tw.state_dict_from_npz(z))
    params = tw.BANK_CONVERTERS[name](sd, "", cfg)
    sd.check_all_used()  # only the original's dead parameters may be left over
    return z, cls(cfg=cfg), params


@pytest.mark.parametrize("name", sorted(FIXTURE_BANKS))
def test_parity_bank_fixture(name):
    z, bank, params = fixture_bank(name)
    x = p2d.from_torch_layout(jnp.asarray(z["input"]))
    ids = jnp.ones((x.shape[0],), jnp.int32) if name == "language" else None
    y, state = bank.apply({"params": params}, x, language_ids=ids)
    assert state is None
    parity.assert_allclose("output", p2d.to_torch_layout(y), z["output"], rtol=1e-4, atol=1e-5)
    if name == "language":
        y0, _ = bank.apply({"params": params}, x)  # language_ids default to 0
        parity.assert_allclose(
            "output_lang0", p2d.to_torch_layout(y0), z["output_lang0"], rtol=1e-4, atol=1e-5
        )


def test_language_bank_selects_the_language_per_row():
    z, bank, params = fixture_bank("language")
    x = p2d.from_torch_layout(jnp.asarray(z["input"]))
    y, _ = bank.apply({"params": params}, x, language_ids=jnp.array([1, 0]))
    np.testing.assert_allclose(p2d.to_torch_layout(y[0]), z["output"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        p2d.to_torch_layout(y[1]), z["output_lang0"][1], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("window", [1, 3, 8])
def test_context_bank_streams_exactly_with_its_window_state(window):
    bank = banks.ContextBank(cfg=cfgs.ContextBankConfig(window_size=window, num_layers=1))
    x = jax.random.normal(jax.random.key(0), (2, 13, 2, 7))
    params = bank.init(jax.random.key(1), x)["params"]
    params["window_weights"] = jax.random.normal(jax.random.key(2), (window,))
    full, _ = bank.apply({"params": params}, x)
    state, pieces = None, []
    for a, b in [(0, 1), (1, 6), (6, 7), (7, 13)]:
        y, state = bank.apply({"params": params}, x[:, a:b], state)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-6)


def test_context_bank_is_a_causal_window_average():
    """Changing x_s moves outputs only at t in [s, s + window)."""
    w = 4
    bank = banks.ContextBank(cfg=cfgs.ContextBankConfig(window_size=w, num_layers=1))
    x = jax.random.normal(jax.random.key(0), (1, 12, 2, 5))
    params = bank.init(jax.random.key(1), x)["params"]
    y0, _ = bank.apply({"params": params}, x)
    y1, _ = bank.apply({"params": params}, x.at[:, 5].add(1.0))
    changed = np.asarray(jnp.abs(y1 - y0).max(axis=(0, 2, 3)) > 1e-7)
    np.testing.assert_array_equal(np.nonzero(changed)[0], np.arange(5, 5 + w))
