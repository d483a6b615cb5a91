"""wave_plots: every figure renders from a tiny (test-preset) model as a valid, non-empty image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from experiments import wave_plots
from qpf.zoo import get_family

EXPECTED = {
    "learning_curve.png",
    "frequencies.png",
    "phases.png",
    "harmonics.png",
    "wave_packets.png",
    "attention.png",
    "polar_phases.png",
    "complex_plane.png",
    "spectrogram.png",
    "interference.png",
    "generation.gif",
}


@pytest.fixture(scope="module")
def tiny_trained():
    """The test preset after a few AdamW steps, with its loss records."""
    cfg = get_family("wavegpt").preset("test").model
    module = get_family("wavegpt").build(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    params = jax.jit(module.init)(jax.random.key(1), ids)["params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        def loss(q):
            logp = jax.nn.log_softmax(module.apply({"params": q}, ids[:, :-1]).logits)
            return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    state, records = tx.init(params), []
    for i in range(4):
        params, state, value = step(params, state)
        records.append({"step": i + 1, "loss": float(value)})
    records.append({"step": 4, "val/loss": records[-1]["loss"]})
    assert records[-2]["loss"] < records[0]["loss"]
    return module, params, cfg, records


def test_every_figure_is_a_valid_nonempty_image(tiny_trained, tmp_path):
    module, params, cfg, records = tiny_trained
    paths = wave_plots.render_all(
        module, params, cfg, records, tmp_path, prompt=[1, 2], gif_steps=3
    )
    assert {p.name for p in paths} == EXPECTED
    for path in paths:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == ("GIF" if path.suffix == ".gif" else "PNG")
            assert img.width > 100
            assert img.height > 100
            pixels = np.asarray(img.convert("L"))
            assert pixels.std() > 1.0, f"{path.name} is blank"
            if path.suffix == ".gif":
                assert img.n_frames == 3


def test_drawn_wave_is_the_harmonic_sum():
    tab = {
        "freqs": np.array([[2.0]]),
        "phases": np.array([[0.5]]),
        "amps": np.array([[[1.0, 0.25]]]),
    }
    t = np.linspace(0, 1, 7)
    want = np.sin(2 * t + 0.5) + 0.25 * np.sin(4 * t + 0.5)
    np.testing.assert_allclose(wave_plots.token_wave(tab, 0, t), want)
