"""The run-directory lock: exclusion across processes, the holder's pid in the error, stale
locks of killed processes taken over, and the lock file never deleted."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpf.training.runlock import RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]

HOLD = (
    "import sys, time; from qpf.training.runlock import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"
)


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(
            RunLockedError, match=rf"in use by another training run \(process {proc.pid}"
        ):
            RunLock(tmp_path / "run").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert f"pid={proc.pid}" in (tmp_path / "run" / ".lock").read_text()
    with caplog.at_level(logging.WARNING), RunLock(tmp_path / "run") as lock:
        assert f"stale lock {lock.path} of process {proc.pid} (no longer running" in caplog.text
        assert f"pid={os.getpid()}" in lock.path.read_text()
    assert lock.path.exists(), "released by emptying, never by deleting"
    assert lock.path.read_text() == ""


def test_release_lets_the_next_run_in_without_a_stale_warning(tmp_path, caplog):
    # flock excludes a second open file of the same process too.
    with RunLock(tmp_path / "run"), pytest.raises(RunLockedError):
        RunLock(tmp_path / "run").acquire()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), RunLock(tmp_path / "run"):
        pass
    assert "stale" not in caplog.text
    assert time.monotonic() - start < 5
