"""The training loop end to end through the CLI: resume exactness, damaged checkpoints,
non-finite losses, validation of options, data-parallel and multi-host equality."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import train as cli
from qpf.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# A model small enough to compile in seconds, with every component of the tiny preset on
# (semantic bank, SSM, global and episodic memory; dropout 0.1 exercises the step RNG).
TINY = [
    "--set", "model.dim=8",
    "--set", "model.backbone.state_dim=16",
    "--set", "model.backbone.num_layers=1",
    "--set", "model.memory.num_slots=16",
    "--set", "model.episodic.window=4",
    "--set", "train.sample_tokens=0",
]  # fmt: skip


def _args(data_dir: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--dataset", "tinyshakespeare", "--tokenizer", "byte", "--data-dir", str(data_dir),
        "--run-dir", str(run_dir), "--steps", str(steps), "--batch-size", "4",
        "--seq-len", "16", "--eval-every", "0", "--save-every", "3", "--eval-batches", "2",
        "--log-every", "1", "--no-progress", *TINY, *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """A 6-step run, and a 3-step run resumed to 6 (module-scoped: trains once)."""
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(_args(data_dir, root / "full", 6, "--profile-steps", "1:3")) == 0
    # Same schedule horizon as the full run: the cosine does not depend on where we stop.
    assert cli.main(_args(data_dir, root / "split", 3, "--set", "optim.decay_steps=6")) == 0
    assert cli.main(["--run-dir", str(root / "split"), "--resume", "--steps", "6",
                     "--no-progress"]) == 0  # fmt: skip
    return root


def test_resume_reproduces_the_uninterrupted_losses(runs):
    full, split = _losses(runs / "full"), _losses(runs / "split")
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([split[s] for s in range(1, 7)], [full[s] for s in range(1, 7)],
                               rtol=1e-6)  # fmt: skip
    assert len(set(full.values())) == 6  # the data moves on: no two steps see one batch


def test_run_outputs_metrics_config_tensorboard_and_checkpoints(runs):
    run = runs / "full"
    records = read_metrics(run)
    val = [r for r in records if "val/loss" in r][-1]
    assert val["step"] == 6
    assert math.isclose(val["val/ppl"], math.exp(val["val/loss"]), rel_tol=1e-6)
    assert 0 < val["val/bpb"] < 10
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["dim"] == 8
    assert config["data"]["tokenizer"] == "byte"
    assert any((run / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        3,
        6,
    ]
    assert [p.name for p in (run / "best").iterdir() if p.name.isdigit()] == ["6"]
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert traces, "--profile-steps 1:3 wrote no jax.profiler trace"
    assert traces[0].stat().st_size > 0


def test_damaged_checkpoint_is_skipped_with_a_warning(runs, tmp_path, caplog):
    from qpf.training.checkpoint import RunCheckpoints

    run = tmp_path / "damaged"
    shutil.copytree(runs / "full", run)
    for f in (run / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    ckpt = RunCheckpoints(run, keep_last=3)
    assert ckpt.latest_meta() is not None  # the meta item of step 6 is still readable
    ckpt.close()
    with caplog.at_level(logging.WARNING):
        assert cli.main(["--run-dir", str(run), "--resume", "--steps", "7",
                         "--no-progress"]) == 0  # fmt: skip
    assert "falling back" in caplog.text
    losses = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in losses][-4:] == [4, 5, 6, 7]  # resumed from step 3
    full = _losses(runs / "full")
    np.testing.assert_allclose(losses[-4]["train/loss"], full[4], rtol=1e-6)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(runs, tmp_path, capsys):
    run = tmp_path / "nan"
    shutil.copytree(runs / "full", run)
    poison = ["--set", "loss.energy=1.0", "--set", "loss.energy_target=NaN"]
    code = cli.main(["--run-dir", str(run), "--resume", "--steps", "9", "--no-progress",
                     *poison])  # fmt: skip
    assert code == 3
    assert "non-finite loss" in capsys.readouterr().err
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    # With nan_policy=skip the same run goes on, dropping every poisoned update.
    code = cli.main(["--run-dir", str(run), "--resume", "--steps", "8", "--no-progress",
                     *poison, "--set", "train.nan_policy=skip"])  # fmt: skip
    assert code == 0
    assert sum(r.get("train/skipped", 0) for r in read_metrics(run)) >= 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.dim=-3"], "dim"),
        (["--preset", "huge"], "unknown qpf preset 'huge'"),
        (["--set", "optim.grad_accum=0"], "OptimConfig.grad_accum"),
        (["--set", "nosuch.field=1"], "SECTION.FIELD"),
        (["--dataset", "nosuchcorpus"], "nosuchcorpus"),
    ],
)
def test_bad_options_give_a_clear_error(data_dir, tmp_path, capsys, extra, message):
    assert cli.main(_args(data_dir, tmp_path / "bad", 2, *extra)) == 2
    assert message in capsys.readouterr().err


def test_existing_run_needs_resume(runs, capsys):
    assert cli.main(["--run-dir", str(runs / "full"), "--steps", "2", "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------- many devices / hosts


def _run_py(code: str, env_extra: dict[str, str], timeout: int = 600) -> str:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _train_code(args: list[str]) -> str:
    return f"import sys; from experiments import train; sys.exit(train.main({args!r}))"


def _first_three_match_the_full_run(runs: Path, run: Path) -> None:
    """Losses of steps 1-3 of ``run`` (3 steps, the full run's schedule horizon of 6) equal
    those of the module's one-device ``full`` run: only the order of the cross-device sums
    differs. Step 1 checks the sharded loss, steps 2-3 the reduced updates.

    Measured (2026-12-03): steps 1-2 equal to float32 resolution, step 3 off by 3.3e-5 (4
    devices in one process, and 2 x 2 devices in two). An update 10% off (the one-device run
    at 0.9 x the learning rate) moves steps 2 and 3 by 2.5e-3 and 5.2e-3. Bound: atol 1e-4.
    """
    a, b = _losses(runs / "full"), _losses(run)
    assert sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], atol=1e-4)


# The data-parallel runs stop at step 3 of the ``runs`` fixture's 6-step cosine, so their
# losses compare with the in-process one-device run without a subprocess of their own.
SAME_HORIZON = ("--set", "optim.decay_steps=6")


@pytest.mark.slow
def test_data_parallel_over_four_devices_matches_one(runs, data_dir, tmp_path):
    four = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
            "--xla_backend_optimization_level=0"}  # fmt: skip
    dp = [*_args(data_dir, tmp_path / "dp", 3, *SAME_HORIZON), "--data-parallel"]
    _run_py(_train_code(dp), four)
    _first_three_match_the_full_run(runs, tmp_path / "dp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(runs, data_dir, tmp_path):
    """Two jax.distributed processes of 2 devices each form one 4-device data-parallel mesh;
    their losses equal the one-device run's (so also the 4-device single-process run's)."""
    flags = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(REPO)}
    procs = []
    for pid in (0, 1):
        args = [*_args(data_dir, tmp_path / "multi", 3, *SAME_HORIZON), "--data-parallel",
                "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(pid)]  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _train_code(args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    _first_three_match_the_full_run(runs, tmp_path / "multi")


# Measured final val/loss over seeds 0, 1, 2: 4.176, 4.213, 4.133 (see the test's docstring).
LEARNED_BOUND = 4.3


@pytest.mark.slow
def test_tiny_preset_learns_tinyshakespeare_in_50_steps(data_dir, tmp_path, capsys):
    """The tiny preset at full size, bytes, 50 steps of 8 x 64 tokens.

    Threshold: the untrained model scores ln 259 = 5.56 nats/byte (uniform over its ids, as
    does a trainer that does not update); a model that knew which of TinyShakespeare's 65
    distinct characters occur, and nothing more, would score ln 65 = 4.17. Measured final
    validation loss (CPU, jax 0.10.2, 2026-12-03, this command with --seed 0 / 1 / 2):
    4.176, 4.213, 4.133 (the loss is still falling steeply at step 50). The bound is the
    worst seed plus the seed-to-seed spread (0.080), rounded up: 4.3, 1.26 nats below the
    untrained loss. This test runs seed 0. (16 x 128 tokens per step reached 3.86-3.98 in
    50 steps, at 4x the cost per step.)
    """
    args = ["--dataset", "tinyshakespeare", "--data-dir", str(data_dir),
            "--run-dir", str(tmp_path / "tiny"), "--steps", "50", "--batch-size", "8",
            "--seq-len", "64", "--eval-every", "50", "--eval-batches", "16", "--log-every",
            "1", "--no-progress", "--set", "train.sample_tokens=16"]  # fmt: skip
    assert cli.main(args) == 0
    losses = _losses(tmp_path / "tiny")
    assert np.mean([losses[s] for s in range(41, 51)]) < np.mean([losses[s] for s in range(1, 11)])
    val = [r for r in read_metrics(tmp_path / "tiny") if "val/loss" in r][-1]
    assert val["val/loss"] < LEARNED_BOUND, val
    assert "--- sample ---" in capsys.readouterr().out
