"""Fault injection: the train and generate CLIs in subprocesses, one fault per case.

Each case asserts the exit status, the one-line message (no traceback), and that nothing
already saved changed: every file under ``checkpoints/`` and ``best/``, ``metrics.jsonl``
and ``config.json`` are hashed before and after. One tiny trained run (module fixture) is
copied per case; most cases fail before anything is compiled, so each costs about one
interpreter start with JAX imported.

Read-only folder: the tests run as root in CI containers, where ``chmod 0555`` does not
stop writes and no read-only mount is available, so the unwritable run directory is a path
below a regular file (``mkdir`` fails with ENOTDIR, the same ``OSError`` path as EROFS or
EACCES). When not root, a ``chmod 0555`` parent is tested as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TINY = [
    "--dataset", "tinyshakespeare", "--tokenizer", "byte", "--batch-size", "4",
    "--seq-len", "16", "--eval-batches", "1", "--log-every", "1", "--no-progress",
    "--set", "model.dim=8", "--set", "model.backbone.state_dim=16",
    "--set", "model.backbone.num_layers=1", "--set", "model.memory.num_slots=16",
    "--set", "model.episodic.window=4", "--set", "train.sample_tokens=0",
    "--set", "train.tensorboard=false", "--set", "optim.decay_steps=2",
]  # fmt: skip
# decay_steps: the learning-rate schedule is compiled into the train step; with one horizon
# for every run, a run that trains past the fixture's (e.g. resumed to step 3) reuses its
# compiled programs from the persistent compilation cache passed to the subprocesses.


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    out = {k: v for k, v in os.environ.items() if k not in ("QPF_DEBUG", "QPF_DATA_DIR")}
    out.update(
        PYTHONPATH=str(REPO),
        QPF_CACHE_DIR=str(cache),
        QPF_OFFLINE="1",
        TIKTOKEN_CACHE_DIR=str(cache / "tiktoken"),
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=0"),
    )
    if cache_dir := jax.config.jax_compilation_cache_dir:  # conftest's, unless disabled
        out.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    out["QPF_TEST_DATA_DIR"] = str(data_dir)
    return out


def cli(env: dict[str, str], command: str, *args: str, timeout: int = 300, **extra: str):
    """``python -m experiments.COMMAND ARGS`` -> CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{command}", *args],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every saved file: checkpoints, best, metrics.jsonl, config.json."""
    files = [*run.glob("checkpoints/**/*"), *run.glob("best/**/*")]
    files += [run / "metrics.jsonl", run / "config.json"]
    return {
        str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in files
        if f.is_file()
    }


def assert_fault(proc, *needles: str, status: int = 2) -> str:
    """Exit ``status``, one ``error:`` line naming every needle, no traceback."""
    err = proc.stderr
    assert proc.returncode == status, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env) -> Path:
    """A 2-step run saved at steps 1 and 2 with evaluations (checkpoints/ and best/)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    data = env["QPF_TEST_DATA_DIR"]
    proc = cli(env, "train", *TINY, "--data-dir", data, "--run-dir", str(run), "--steps", "2",
               "--save-every", "1", "--eval-every", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "next: python -m experiments.generate --run-dir" in proc.stdout
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ------------------------------------------------------------------------- resume


def test_best_keeps_one_step_the_lowest_validation_loss(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").open()]
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    assert sorted(val) == [1, 2]
    best = [p.name for p in (trained / "best").iterdir() if p.name.isdigit()]
    assert best == [str(min(val, key=val.get))]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "model.dim=16"], ["model.dim: 8 -> 16"]),
        (["--seq-len", "32"], ["data.seq_len: 16 -> 32"]),
    ],
    ids=["model-shape", "data-stream"],
)
def test_resume_refuses_a_changed_model_or_data_stream(run, env, args, needles):
    before = snapshot(run)
    proc = cli(env, "train", "--run-dir", str(run), "--resume", "--steps", "4", *args)
    assert_fault(proc, *needles, "different configuration", "new --run-dir")
    assert snapshot(run) == before


def test_resume_without_a_readable_checkpoint_is_an_error(run, env):
    for step in (run / "checkpoints").iterdir():
        shutil.rmtree(step)
    before = snapshot(run)
    proc = cli(env, "train", "--run-dir", str(run), "--resume", "--steps", "4")
    assert_fault(proc, "no readable checkpoint", str(run / "checkpoints"))
    assert snapshot(run) == before


def test_lost_config_and_damaged_newest_checkpoint_then_training_past_it(run, env):
    """config.json comes back from the checkpoint; step 2 (damaged) falls back to step 1,
    and saving step 2 again replaces the damaged folder."""
    (run / "config.json").unlink()
    for f in (run / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    proc = cli(env, "train", "--run-dir", str(run), "--resume", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "config.json is missing: using the run config saved in checkpoint step 2" in err
    assert "checkpoint step 2 in" in err
    assert "unreadable" in err
    assert "resumed from step 1" in err
    assert "replaced checkpoint step 2" in err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
    state = [f for f in (run / "checkpoints" / "2" / "state").rglob("*") if f.is_file()]
    assert state
    assert all(f.read_bytes() != b"garbage" for f in state)
    assert list((run / "damaged").iterdir()), "the damaged copy is kept"
    from qpf.training.checkpoint import RunCheckpoints

    checkpoints = RunCheckpoints(run, read_only=True)
    try:
        assert checkpoints.read_meta(2)["step"] == 2  # the replacement is a whole checkpoint
    finally:
        checkpoints.close()
    steps = [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "train/loss" in r
    ]
    assert steps == [1, 2, 3], "one train record per step after the resume"


# ---------------------------------------------------------------------- run lock


def _wait_for_lock(run: Path, pid: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run / ".lock"
        if lock.exists() and f"pid={pid}\n" in lock.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the first run exited early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail("the first run never took the lock")


def test_two_concurrent_runs_then_a_stale_lock(run, env):
    holder = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--run-dir", str(run), "--resume",
         "--steps", "100000", "--save-every", "0", "--eval-every", "0", "--no-progress"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_lock(run, holder.pid, holder)
        proc = cli(env, "train", "--run-dir", str(run), "--resume", "--steps", "4")
        assert_fault(proc, "in use by another training run", f"process {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed run's lock file still names it: a stale lock, detected and taken over.
    before = snapshot(run)
    proc = cli(env, "train", "--run-dir", str(run), "--resume", "--set", "model.dim=16")
    assert f"taking over the stale lock {run / '.lock'} of process {holder.pid}" in proc.stderr
    assert_fault(proc, "model.dim: 8 -> 16")  # got past the lock to the next check
    assert snapshot(run) == before


# ------------------------------------------------------------------ files and input


def test_unwritable_run_directory(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = cli(env, "train", *TINY, "--data-dir", env["QPF_TEST_DATA_DIR"],
               "--run-dir", str(blocker / "run"), "--steps", "2")  # fmt: skip
    assert_fault(proc, f"cannot use {blocker / 'run'}", "choose another path")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        proc = cli(env, "train", *TINY, "--data-dir", env["QPF_TEST_DATA_DIR"],
                   "--run-dir", str(ro / "run"), "--steps", "2")  # fmt: skip
        assert_fault(proc, str(ro / "run"), "writable --run-dir")


def test_zero_is_a_value_not_the_default(env, tmp_path):
    proc = cli(env, "train", *TINY, "--run-dir", str(tmp_path / "r"), "--steps", "0")
    assert_fault(proc, "TrainConfig.steps = 0", "int >= 1")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        ("--batch-size", "DataConfig.batch_size = 0"),
        ("--seq-len", "DataConfig.seq_len = 0"),
        ("--log-every", "TrainConfig.log_every = 0"),
        ("--grad-accum", "OptimConfig.grad_accum"),
    ],
)
def test_zero_valued_options_in_process(tmp_path, capsys, flag, needle):
    from experiments import train

    assert train.main([*TINY, "--run-dir", str(tmp_path / "r"), flag, "0"]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def _text_corpus(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    return f"text:{path}"


def test_corpus_too_small_says_what_fits(env, tmp_path):
    corpus = _text_corpus(tmp_path, b"First paragraph of a tiny corpus.\n\nSecond one here.\n")
    args = [*TINY, "--dataset", corpus, "--run-dir", str(tmp_path / "r"), "--seq-len", "32"]
    line = assert_fault(cli(env, "train", *args), "too small", "tokens", "--set data.mode=pad")
    assert "--seq-len 8 (at --batch-size 4)" in line, line


def test_invalid_utf8_corpus_names_the_file(env, tmp_path):
    corpus = _text_corpus(tmp_path, b"caf\xe9 au lait\n\n" * 50)
    proc = cli(env, "train", *TINY, "--dataset", corpus, "--run-dir", str(tmp_path / "r"))
    assert_fault(proc, f"{corpus[5:]} is not valid UTF-8", "byte 3")


def test_empty_corpus_names_the_file(env, tmp_path):
    corpus = _text_corpus(tmp_path, b"\n \n\n")
    proc = cli(env, "train", *TINY, "--dataset", corpus, "--run-dir", str(tmp_path / "r"))
    assert_fault(proc, f"file {corpus[5:]} holds no text")


def test_gpt2_offline_without_data_folder_names_the_ranks_file(env, tmp_path):
    corpus = _text_corpus(tmp_path, b"Some text.\n\nMore text.\n" * 40)
    args = [*TINY, "--dataset", corpus, "--tokenizer", "gpt2", "--run-dir", str(tmp_path / "r")]
    assert_fault(cli(env, "train", *args), "gpt2.tiktoken", "--data-dir or QPF_DATA_DIR")


# ----------------------------------------------------------------- config.json


def test_malformed_config_json_on_resume(run, env):
    (run / "config.json").write_text('{"model": "qpf:tiny",')
    before = snapshot(run)
    proc = cli(env, "train", "--run-dir", str(run), "--resume", "--steps", "4")
    assert_fault(proc, str(run / "config.json"), "not valid JSON", "move it away")
    assert snapshot(run) == before


def test_incomplete_config_json_for_generate(run, env):
    config = json.loads((run / "config.json").read_text())
    del config["model"]
    (run / "config.json").write_text(json.dumps(config))
    before = snapshot(run)
    proc = cli(env, "generate", "--run-dir", str(run), "--prompt", "A")
    assert_fault(proc, str(run / "config.json"), "missing section(s) model", "move it away")
    assert snapshot(run) == before


def test_debug_shows_the_traceback(run, env):
    (run / "config.json").write_text("{")
    proc = cli(env, "generate", "--run-dir", str(run), "--prompt", "A", QPF_DEBUG="1")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
