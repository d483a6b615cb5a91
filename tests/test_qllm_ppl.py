"""The QLLM headline-metric experiment: upstream's byte stream, windows and PPL definition."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.qllm_ppl import byte_windows, hf_rows_joined, make_eval, report
from qpf.models.qllm import QLLM, QLLMConfig


def test_rows_are_joined_with_blank_lines_like_the_hf_rows():
    text = " = A = \n\n Body .\n"
    # HF rows: " = A = \n", "\n", " Body .\n"; joined with "\n\n".
    assert hf_rows_joined(text) == b" = A = \n\n\n\n\n\n Body .\n"


def test_windows_follow_upstream_chunking():
    data = bytes(range(23))
    x, y = byte_windows(data, 5)
    # i = 0, 5, 10, 15 while i < n - t - 1 = 17: four windows, the tail dropped.
    assert x.shape == (4, 5)
    np.testing.assert_array_equal(x[1], np.arange(5, 10))
    np.testing.assert_array_equal(y[3], np.arange(16, 21))
    assert byte_windows(data, 5, max_windows=2)[0].shape == (2, 5)
    assert byte_windows(bytes(6), 5)[0].shape == (0, 5)


def test_eval_is_exp_of_byte_weighted_mean_ce():
    c = QLLMConfig(vocab_size=256, dim=8, num_layers=1, num_heads=2, max_len=7)
    model = QLLM(c)
    x = np.random.default_rng(0).integers(0, 256, (5, 7)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    got = make_eval(model, batch=5)(params, x[:4], y[:4])  # batches of 5 (holding 4)
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)(params, jnp.asarray(x))
    logp = jax.nn.log_softmax(logits[:4])
    nll = -np.take_along_axis(np.asarray(logp), y[:4, :, None], -1).mean()
    np.testing.assert_allclose(got["ppl_per_byte"], math.exp(nll), rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nll / math.log(2), rtol=1e-5)
    assert got["bytes"] == 28
    table = report({k: got for k in ("upstream", "heldout_joined", "heldout_plain", "headline")})
    assert table.count("\n") == 5
