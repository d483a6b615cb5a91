"""Comparison helpers for parity tests: every failing key reported, top-k robust to near-ties.

A parity test collects the failures of all keys of a fixture (``close``, ``topk``) and then
asserts once with ``report``, so a run shows every key that disagrees, not only the first.

Top-k results (slot indices and their weights, in rank order) are compared as selections:
per query the selected *set* must be identical; then the weights are compared slot by slot
after aligning our rank order to the reference's. Two slots whose scores tie within
float32 noise may swap ranks (the fixture generator and we round differently) without
failing; selecting a different slot still fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np
from parity_log import record


def close(name: str, ours, ref, rtol: float, atol: float) -> list[str]:
    """[] when ``ours`` matches ``ref`` within rtol/atol, else one line naming the worst entry."""
    record(name, ours, ref)
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return [f"{name}: shape {ours.shape} != reference {ref.shape}"]
    excess = np.abs(ours - ref) - (atol + rtol * np.abs(ref))
    bad = ~(excess <= 0)  # NaN counts as bad
    if not bad.any():
        return []
    i = np.unravel_index(
        np.argmax(np.where(bad, np.nan_to_num(excess, nan=np.inf), -np.inf)), ref.shape
    )
    return [
        f"{name}: {int(bad.sum())}/{ref.size} entries off (rtol {rtol:g}, atol {atol:g}); "
        f"worst at {tuple(int(j) for j in i)}: {ours[i]:.10g} vs {ref[i]:.10g}"
    ]


def align_topk(ours_idx, ref_idx, *ours_values) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorder our per-rank arrays ``[..., k]`` into the reference's rank order per query.

    Returns (the reordered ``ours_values``, a bool mask ``[...]`` of queries whose selected
    sets differ; those keep our order).
    """
    ours_idx, ref_idx = np.asarray(ours_idx), np.asarray(ref_idx)
    same_set = np.all(np.sort(ours_idx, -1) == np.sort(ref_idx, -1), -1)
    # For each reference rank, the rank in ours holding the same slot (valid where same_set).
    perm = np.argmax(ref_idx[..., :, None] == ours_idx[..., None, :], -1)
    perm = np.where(same_set[..., None], perm, np.arange(ours_idx.shape[-1]))
    aligned = [np.take_along_axis(np.asarray(v), perm, -1) for v in ours_values]
    return aligned, ~same_set


def topk(name: str, ours_idx, ref_idx, ours_w, ref_w, rtol: float, atol: float) -> list[str]:
    """Failures of a top-k read: different selected sets, or weights off after alignment."""
    (aligned_w,), differs = align_topk(ours_idx, ref_idx, ours_w)
    record(f"{name} selected sets", np.sort(ours_idx, -1), np.sort(ref_idx, -1))
    failures = []
    if differs.any():
        where = tuple(int(j) for j in np.argwhere(differs)[0])
        failures.append(
            f"{name}: {int(differs.sum())} queries select other slots; first at {where}: "
            f"{sorted(np.asarray(ours_idx)[where].tolist())} vs "
            f"{sorted(np.asarray(ref_idx)[where].tolist())}"
        )
    return failures + close(f"{name} weights (rank-aligned)", aligned_w, ref_w, rtol, atol)


def assert_allclose(key: str, actual, desired, **tolerances) -> None:
    """``np.testing.assert_allclose(actual, desired, **tolerances)``, the comparison recorded
    under ``key`` in the parity log (``tests/parity_log.py``)."""
    record(key, actual, desired)
    np.testing.assert_allclose(actual, desired, **tolerances)


def report(failures: list[str]) -> None:
    """One assertion listing every failure."""
    assert not failures, f"{len(failures)} parity failures:\n" + "\n".join(failures)


@contextlib.contextmanager
def float32_matmuls() -> Iterator[None]:
    """Pin float32 dots to full float32 (GPUs otherwise default to TF32 for them)."""
    with jax.default_matmul_precision("float32"):
        yield
