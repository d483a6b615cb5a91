"""Shared test fixtures: the reference folder, golden fixture files, float64 mode.

``../shared`` (or ``QPF_SHARED_DIR``) holds the golden outputs of the original PyTorch code
and the corpora. When it is absent, tests that need it are skipped with a reason; with
``QPF_REQUIRE_SHARED=1`` (set by ``.ci/run``) a missing folder is a failure instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Any

# Small test shapes spend most of their time in XLA's CPU compiler; its lowest optimisation
# level halves the suite's wall time. Set XLA_FLAGS yourself to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax
import numpy as np
import parity_log
import pytest

REPO = Path(__file__).resolve().parents[1]

# Most of the suite's time is XLA compiling small models; a persistent compilation cache
# makes a second run (and every test that rebuilds an identical program, e.g. a resumed
# trainer) reuse executables. QPF_JAX_CACHE_DIR overrides the folder; "off" disables it.
_cache_dir = os.environ.get("QPF_JAX_CACHE_DIR", str(REPO / ".cache" / "jax"))
if _cache_dir != "off":
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ------------------------------------------------------------------ scheduling
#
# The README's command runs ``-n 2 --dist loadscope --no-loadscope-reorder``: xdist hands
# each worker whole scopes, in collection order, as it runs dry. Here a scope is a test file
# (its module-level compiled models are built once per worker), except the family-generic
# tests, which form one scope per model case so the cases spread over both workers. Scopes
# are collected most expensive first (the longest-processing-time rule), so no worker
# starts a long scope last. (xdist's own ``loadgroup`` marks cannot do this under pytest
# 9.2, whose node ids no longer read the ``_nodeid`` that xdist rewrites.)

FAMILY_TESTS = "test_families.py"

# The heaviest files, by measured wall time (``--durations``, 2 cores, cold compile cache),
# heaviest first; the family cases follow them, then every other file in collection order.
HEAVY_FIRST: tuple[str, ...] = (
    "test_phase_field.py",
    "test_trainer.py",
    "test_torch_weights.py",
    "test_scan.py",
    "test_matrix_state.py",
    "test_generation.py",
    "test_qllm.py",
    "test_qllm_v2_training.py",
    "test_faults.py",
    "test_qllm_v2.py",
    "test_step.py",
    "test_qllm_v3.py",
    "test_report.py",
)


def schedule_scope(nodeid: str) -> str:
    """The scope of a test: its file, or ``<file>::<spec>`` for a family-generic case."""
    path, _, rest = nodeid.partition("::")
    if path.endswith(FAMILY_TESTS) and rest.endswith("]") and "[" in rest:
        return f"{path}::{rest[rest.index('[') + 1 : -1]}"
    return path


def _weight(scope: str) -> tuple[int, int]:
    name = scope.rsplit("/", 1)[-1]
    if name in HEAVY_FIRST:
        return (0, HEAVY_FIRST.index(name))
    return (1, 0) if name.startswith(f"{FAMILY_TESTS}::") else (2, 0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _weight(schedule_scope(item.nodeid)))  # stable within a scope


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadscope``, xdist's scope scheduler with ``schedule_scope``'s scopes."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FamilyCaseScopes(LoadScopeScheduling):
        # ``_split_scope`` is the one method xdist's own scope schedulers (loadscope,
        # loadfile, loadgroup) override to define their scopes (pytest-xdist >= 3.8).
        def _split_scope(self, nodeid: str) -> str:
            return schedule_scope(nodeid)

    return FamilyCaseScopes(config, log)


def shared_dir_or_none() -> Path | None:
    env = os.environ.get("QPF_SHARED_DIR")
    path = Path(env) if env else REPO.parent / "shared"
    return path.resolve() if path.is_dir() else None


def require_shared() -> Path:
    """The shared folder, or skip (fail under QPF_REQUIRE_SHARED=1) with the reason."""
    path = shared_dir_or_none()
    if path is None:
        where = os.environ.get("QPF_SHARED_DIR") or str(REPO.parent / "shared")
        reason = f"shared reference folder not found at {where} (set QPF_SHARED_DIR)"
        if os.environ.get("QPF_REQUIRE_SHARED") == "1":
            pytest.fail(f"QPF_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path


def fixtures_root() -> Path:
    """Root of the golden fixtures: ``QPF_FIXTURES_DIR``, else ``<shared>/fixtures``.

    Skips (fails under ``QPF_REQUIRE_SHARED=1``) when the folder does not exist.
    """
    env = os.environ.get("QPF_FIXTURES_DIR")
    if env:
        path = Path(env).resolve()
        if not path.is_dir():
            pytest.fail(f"QPF_FIXTURES_DIR={env} is not a folder")
        return path
    return require_shared() / "fixtures"


def fixture_files(subdir: str, pattern: str) -> list[Path]:
    """Fixture files of one system (``subdir`` under the root, "" for v4) matching ``pattern``.

    Parity tests select files by glob, never by exact name, so another fixture set of the
    same layout is checked by the same tests. A pattern that matches nothing is a failure.
    """
    folder = fixtures_root() / subdir if subdir else fixtures_root()
    files = sorted(folder.glob(pattern))
    if not files:
        pytest.fail(f"no fixture file matches {folder / pattern} (set QPF_FIXTURES_DIR)")
    return files


def fixture_failures(subdir: str, pattern: str, failures_of) -> list[str]:
    """Every failure ``failures_of(z)`` reports over the fixture files of ``subdir`` matching
    ``pattern`` (``z``: the file as a dict), prefixed by the file name, so a parity test
    reports every failing key of every file, not only the first."""
    failures = []
    for path in parity_log.each_fixture(fixture_files(subdir, pattern)):
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        failures += [f"{path.name} {f}" for f in failures_of(data)]
    return failures


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


def load_fixture(name: str) -> dict[str, np.ndarray]:
    """A module fixture from shared/fixtures as a dict (skips if the folder is absent)."""
    parity_log.name_fixture(name)
    with np.load(require_shared() / "fixtures" / name) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------ golden model files


def golden_patterns() -> list[str]:
    """Patterns from QPF_V4_GOLDEN (os.pathsep-separated paths or globs), or the default."""
    env = os.environ.get("QPF_V4_GOLDEN")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    shared = shared_dir_or_none()
    if shared is None:
        return []
    return [str(shared / "fixtures" / "v4_golden_*.npz")]


def golden_files() -> list[str]:
    files: list[str] = []
    for pattern in golden_patterns():
        files.extend(sorted(glob.glob(pattern)))
    return sorted(dict.fromkeys(files))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "golden_path" in metafunc.fixturenames:
        files = golden_files()
        ids = [Path(f).stem for f in files]
        # With no file the test still runs once and skips or fails with the reason.
        metafunc.parametrize("golden_path", files or [None], ids=ids or ["no-golden-files"])


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (restored afterwards)."""
    ctx = jax.enable_x64(True) if hasattr(jax, "enable_x64") else contextlib.nullcontext()
    with ctx:
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared corpora folder (``shared/data``), or skip like ``require_shared``."""
    return require_shared() / "data"


@pytest.fixture(params=["float32", "float64"])
def parity_dtype(request: pytest.FixtureRequest) -> str:
    """Runs a parity test once per dtype; the float64 run has x64 enabled for its body."""
    if request.param == "float64":
        request.getfixturevalue("x64")
    return request.param
