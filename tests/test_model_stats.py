"""``qpf.diagnostics.model_stats.embedding_phases`` on every family's embedding layout."""

from __future__ import annotations

import numpy as np

from qpf.diagnostics.model_stats import embedding_phases

RNG = np.random.default_rng(0)
RE, IM = RNG.normal(size=(11, 5)), RNG.normal(size=(11, 5))
IDS = np.array([0, 3, 10, 99])  # 99 is clipped to the last row


def _want() -> np.ndarray:
    rows = np.clip(IDS, 0, 10)
    return np.arctan2(IM[rows], RE[rows])


def test_phase2d_tables_and_patcher_tables():
    tables = {"embedding_re": RE, "embedding_im": IM}
    np.testing.assert_allclose(embedding_phases({"embed": tables}, IDS), _want())
    np.testing.assert_allclose(embedding_phases({"patcher": {"embed": tables}}, IDS), _want())


def test_lightwave_real_and_imaginary_arrays():
    np.testing.assert_allclose(embedding_phases({"embed": RE, "imag_embed": IM}, IDS), _want())


def test_real_embeddings_have_no_phases():
    assert embedding_phases({"embed": {"embedding": RE}}, IDS) is None  # transformer, DiagRNN
    assert embedding_phases({"embed": RE}, IDS) is None  # a bare real table
    assert embedding_phases({"blocks": {}}, IDS) is None  # no embedding at all
