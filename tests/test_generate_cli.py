"""experiments.generate and qpf.generation.from_run against tiny runs trained here.

Each model is trained once per module (one optimizer step of a minimal config); the
ground truth for greedy decoding is the full forward pass re-run on the growing sequence.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import generate as gen_cli
from experiments import train as train_cli
from qpf.generation.from_run import generate_from_run
from qpf.training.restore import load_run

PROMPT = "ROMEO: But soft"
# Minimal shapes: compilation dominates the cost of these tests on CPU.
COMMON = [
    "--tokenizer=byte",
    "--dataset=tinyshakespeare",
    "--steps=1",
    "--batch-size=2",
    "--seq-len=8",
    "--eval-every=0",
    "--save-every=1",
    "--eval-batches=1",
    "--no-progress",
    "--set=train.sample_tokens=0",
    "--set=train.tensorboard=false",
]
QPF_SETS = [
    "--set=model.dim=8",
    "--set=model.backbone.state_dim=16",
    "--set=model.backbone.num_layers=1",
    "--set=model.memory.num_slots=16",
    '--set=model.banks=[{"type": "semantic", "num_concepts": 8, "num_layers": 1}]',
    "--set=model.episodic.window=4",
]
TRANSFORMER_MAX_LEN = 32
TRANSFORMER_SETS = [
    "--set=model.dim=8",
    "--set=model.num_layers=1",
    "--set=model.num_heads=2",
    f"--set=model.max_len={TRANSFORMER_MAX_LEN}",
]


def _train(run_dir: Path, data_dir: Path, model: str, sets: list[str]) -> Path:
    argv = [f"--model={model}", "--preset=tiny", f"--data-dir={data_dir}", f"--run-dir={run_dir}"]
    assert train_cli.main(argv + COMMON + sets) == 0
    return run_dir


@pytest.fixture(scope="module")
def qpf_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    return _train(tmp_path_factory.mktemp("gen") / "qpf", data_dir, "qpf", QPF_SETS)


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("gen") / "transformer"
    return _train(path, data_dir, "transformer", TRANSFORMER_SETS)


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout without the final newline, stderr)."""
    capsys.readouterr()
    try:
        rc = gen_cli.main(list(argv))
    except SystemExit as err:  # argparse rejects a bad choice itself, with status 2
        rc = int(err.code)
    out, err = capsys.readouterr()
    return rc, out.removesuffix("\n"), err


def _greedy_full_forward(run_dir: Path, prompt: str, new_tokens: int) -> str:
    """Greedy continuation by re-running the whole model on the growing sequence."""
    run = load_run(run_dir)
    # Compiled (one shape per length): op-by-op dispatch of the model is slower still.
    forward = jax.jit(lambda p, x: run.module.apply(p, x, deterministic=True).logits)
    ids = run.tokenizer.encode(prompt)
    new: list[int] = []
    for _ in range(new_tokens):
        logits = forward(run.params, jnp.asarray([ids + new], jnp.int32))
        token = int(np.argmax(np.asarray(logits[0, -1])))
        if token == run.tokenizer.eos_id:
            break
        new.append(token)
    return run.tokenizer.decode(new)


def test_greedy_cli_equals_full_forward(qpf_run: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = _cli(
        capsys, "--run-dir", str(qpf_run), "--prompt", PROMPT, "--temperature", "0",
        "--max-new-tokens", "3",
    )  # fmt: skip
    assert rc == 0, err
    assert "step 1" in err
    assert out == _greedy_full_forward(qpf_run, PROMPT, 3)


def test_chunked_prompt_file_matches_one_pass(
    qpf_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A prompt longer than the chunk is prefilled in pieces with the carried state (chunks
    # of len(PROMPT): the shape the other tests compile already).
    text = PROMPT * 3
    path = tmp_path / "prompt.txt"
    path.write_text(text, encoding="utf-8")
    whole = generate_from_run(qpf_run, text, max_new_tokens=4, temperature=0)
    rc, out, err = _cli(
        capsys, "--run-dir", str(qpf_run), "--prompt-file", str(path), "--temperature", "0",
        "--max-new-tokens", "4", "--chunk-size", str(len(PROMPT)),
    )  # fmt: skip
    assert rc == 0, err
    assert out == whole


def test_same_seed_same_text(qpf_run: Path, capsys: pytest.CaptureFixture) -> None:
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 20, "seed": 3}
    first = generate_from_run(qpf_run, PROMPT, **kw)
    assert generate_from_run(qpf_run, PROMPT, **kw) == first
    rc, out, err = _cli(
        capsys, "--run-dir", str(qpf_run), "--prompt", PROMPT, "--top-k", "20",
        "--seed", "3", "--max-new-tokens", "6",
    )  # fmt: skip
    assert rc == 0, err
    assert out == first


def test_num_samples_and_empty_prompt(qpf_run: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = _cli(
        capsys, "--run-dir", str(qpf_run), "--prompt", "", "--num-samples", "2",
        "--max-new-tokens", "3", "--top-k", "20",
    )  # fmt: skip
    assert rc == 0, err
    assert "--- sample 0 ---" in out
    assert "--- sample 1 ---" in out


def test_beam_search_and_best_checkpoint(qpf_run: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _out, err = _cli(
        capsys, "--run-dir", str(qpf_run), "--prompt", PROMPT, "--beam-width", "2",
        "--length-penalty", "0.6", "--max-new-tokens", "3", "--checkpoint", "best",
    )  # fmt: skip
    assert rc == 0, err
    assert "(best)" in err
    assert load_run(qpf_run, "best").step == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--min-p", "1"], "min_p"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--chunk-size", "0"], "chunk_size"),
        (["--beam-width", "2", "--num-samples", "2"], "num_samples"),
        (["--checkpoint", "newest"], "invalid choice"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "prompt-file"),
    ],
)
def test_bad_options_exit_2(
    qpf_run: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    argv = ["--run-dir", str(qpf_run), *flags]
    if "--prompt-file" not in flags:
        argv += ["--prompt", PROMPT]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2
    assert message in err
    assert out == ""


def test_missing_run_and_checkpoints_exit_2(
    qpf_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc, _, err = _cli(capsys, "--run-dir", str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 2
    assert "does not exist" in err
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(qpf_run / "config.json", empty / "config.json")
    rc, _, err = _cli(capsys, "--run-dir", str(empty), "--prompt", "x")
    assert rc == 2
    assert "train first: python -m experiments.train" in err


def test_morphological_run_is_refused(qpf_run: Path, tmp_path: Path) -> None:
    config = json.loads((qpf_run / "config.json").read_text(encoding="utf-8"))
    config["data"]["tokenizer"] = "morphological"
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="morphological"):
        load_run(tmp_path)


def test_transformer_generates_and_rejects_too_long_prompt(
    transformer_run: Path, capsys: pytest.CaptureFixture
) -> None:
    rc, out, err = _cli(
        capsys, "--run-dir", str(transformer_run), "--prompt", PROMPT, "--temperature", "0",
        "--max-new-tokens", "3", "--chunk-size", "8",
    )  # fmt: skip
    assert rc == 0, err
    assert out == _greedy_full_forward(transformer_run, PROMPT, 3)
    n = len(PROMPT.encode())
    rc, out, err = _cli(
        capsys, "--run-dir", str(transformer_run), "--prompt", PROMPT, "--max-new-tokens",
        str(TRANSFORMER_MAX_LEN),
    )  # fmt: skip
    assert rc == 2
    assert out == ""
    assert (
        f"prompt of {n} tokens + {TRANSFORMER_MAX_LEN} new tokens exceeds the model's "
        f"max_len {TRANSFORMER_MAX_LEN}"
    ) in err
