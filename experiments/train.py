"""Train a qpf (or baseline) language model: ``python -m experiments.train [options]``.

With no options it trains the tiny preset on TinyShakespeare in a few CPU minutes (falling
back to the Python standard library's English text when the corpus is neither on disk nor
downloadable). See the README for every option.

Every fault (a bad option, a missing corpus, a damaged or foreign run directory, a run
directory in use) is one ``error:`` line on stderr and exit status 2; ``--debug`` (or
``QPF_DEBUG=1``) shows tracebacks. A diverged run exits with status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

from experiments.cli import run_main, setup_logging
from qpf.config import ConfigError
from qpf.data import DataConfig, MissingDataError
from qpf.generation.train_sample import make_sample_fn
from qpf.training import distributed as dist
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig
from qpf.training.restore import read_run_config
from qpf.training.trainer import Trainer, TrainingDiverged
from qpf.zoo import family_names, resolve_model

DEFAULT_DATASET = "tinyshakespeare"
FALLBACK_DATASET = "pydoc"
DEFAULT_MODEL, DEFAULT_PRESET, DEFAULT_TOKENIZER = "qpf", "tiny", "byte"
DEFAULT_STEPS, DEFAULT_SEQ_LEN, DEFAULT_EVAL_EVERY = 300, 128, 100
DEFAULT_EVAL_BATCHES, DEFAULT_SAVE_EVERY, DEFAULT_LOG_EVERY = 20, 100, 10

log = logging.getLogger("experiments.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Every default is None so that "given" and "not given" differ: 0 is a value (and is
    # validated by the config), and a resumed run sees exactly which options were given.
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__)
    p.add_argument(
        "--model",
        default=None,
        help="model family: " + ", ".join(family_names()) + " (default qpf)",
    )
    p.add_argument("--preset", default=None, help="preset name (default tiny), or FAMILY:PRESET")
    p.add_argument("--dataset", default=None, help=f"corpus (default {DEFAULT_DATASET})")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="byte (default; the model's vocabulary follows the tokenizer), gpt2, morphological",
    )
    p.add_argument("--data-dir", default=None, help="corpus folder (default $QPF_DATA_DIR)")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/MODEL-DATASET)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--seq-len", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--eval-every", type=int, default=None, help="default 100; 0 = at the end")
    p.add_argument("--eval-batches", type=int, default=None, help="default 20; 0 = whole split")
    p.add_argument("--save-every", type=int, default=None, help="default 100; 0 = at the end")
    p.add_argument("--log-every", type=int, default=None, help="default 10")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--data-parallel", action="store_true", help="shard batches over devices")
    p.add_argument("--coordinator-address", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--profile-steps", default=None, help="A:B, trace steps A..B-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also QPF_DEBUG=1)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field (repeatable): model.dim=128, optim.weight_decay=0",
    )
    return p.parse_args(argv)


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected SECTION.FIELD=VALUE")
        out[key.strip()] = value.strip()
    return out


def _given(value, default):
    return default if value is None else value


def _model_spec(args: argparse.Namespace) -> str | None:
    """``family:preset`` from --model/--preset; None when neither was given."""
    if args.preset is None and args.model is None:
        return None
    preset = _given(args.preset, DEFAULT_PRESET)
    return preset if ":" in preset else f"{_given(args.model, DEFAULT_MODEL)}:{preset}"


def build_config(args: argparse.Namespace) -> RunConfig:
    """A fresh run's config from the preset, the flags and the --set overrides."""
    spec = _model_spec(args) or f"{DEFAULT_MODEL}:{DEFAULT_PRESET}"
    _family, preset = resolve_model(spec)
    seed = _given(args.seed, 0)
    data = DataConfig(
        corpus=_given(args.dataset, DEFAULT_DATASET),
        tokenizer=_given(args.tokenizer, DEFAULT_TOKENIZER),
        seq_len=_given(args.seq_len, DEFAULT_SEQ_LEN),
        batch_size=_given(args.batch_size, preset.batch_size),
        seed=seed,
        data_dir=args.data_dir,
    )
    model_config = preset.model
    if args.dtype:
        model_config = dataclasses.replace(model_config, dtype=args.dtype)
    optim = OptimConfig(lr=args.lr, grad_accum=_given(args.grad_accum, 1))
    train = TrainConfig(
        steps=_given(args.steps, DEFAULT_STEPS),
        eval_every=_given(args.eval_every, DEFAULT_EVAL_EVERY),
        eval_batches=_given(args.eval_batches, DEFAULT_EVAL_BATCHES),
        save_every=_given(args.save_every, DEFAULT_SAVE_EVERY),
        log_every=_given(args.log_every, DEFAULT_LOG_EVERY),
        seed=seed,
        data_parallel=args.data_parallel,
        profile_steps=args.profile_steps or "",
        progress=not args.no_progress,
    )
    run = RunConfig(spec, model_config, data, optim, LossConfig(), train)
    return run.with_overrides(_overrides(args.set))


def resume_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """The saved config of ``run_dir`` with every option given now applied.

    Loop options (steps, schedule) change freely; model and data options are applied too,
    so that the trainer can refuse a resume that would change the model or the data stream
    (instead of silently ignoring them).
    """
    run = read_run_config(run_dir, recover=True)
    loop = {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_batches": args.eval_batches,
        "save_every": args.save_every,
        "log_every": args.log_every,
        "profile_steps": args.profile_steps,
        "seed": args.seed,
    }
    train = dataclasses.replace(
        run.train,
        **{k: v for k, v in loop.items() if v is not None},
        progress=not args.no_progress,
        data_parallel=args.data_parallel or run.train.data_parallel,
    )
    data_flags = {
        "corpus": args.dataset,
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "data_dir": args.data_dir,
    }
    data = dataclasses.replace(run.data, **{k: v for k, v in data_flags.items() if v is not None})
    optim = run.optim
    if args.lr is not None or args.grad_accum is not None:
        optim = dataclasses.replace(
            optim,
            lr=_given(args.lr, optim.lr),
            grad_accum=_given(args.grad_accum, optim.grad_accum),
        )
    model, model_config = run.model, run.model_config
    spec = _model_spec(args)
    if spec is not None and spec != run.model:
        model, model_config = spec, resolve_model(spec)[1].model
    if args.dtype:
        model_config = dataclasses.replace(model_config, dtype=args.dtype)
    run = dataclasses.replace(
        run, model=model, model_config=model_config, data=data, optim=optim, train=train
    )
    return run.with_overrides(_overrides(args.set))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return run_main(lambda: _main(args), argv)


def _main(args: argparse.Namespace) -> int:
    dist.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        config_missing = not (run_dir / "config.json").exists()
        run = resume_config(args, run_dir)
    else:
        config_missing = False
        run = build_config(args)
        run_dir = run_dir or Path("runs") / f"{run.model.replace(':', '-')}-{run.data.corpus}"
    trainer = _make_trainer(run, run_dir, args)
    try:
        if config_missing and trainer.is_main:
            log.info("wrote %s back from the checkpoint", trainer.run_dir / "config.json")
        cfg = trainer.config
        print(f"run directory: {trainer.run_dir}  (model {cfg.model}, corpus {cfg.data.corpus})")
        result = trainer.run()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    _print_summary(result, trainer)
    return 0


def _print_summary(result, trainer: Trainer) -> None:
    if not trainer.is_main:
        return
    if result.val:
        print(
            f"done: step {result.step}, val loss {result.val['val/loss']:.4f}, "
            f"ppl {result.val['val/ppl']:.2f}, bpb {result.val['val/bpb']:.4f}"
        )
    print(f"next: {generate_command(trainer)}")


def generate_command(trainer: Trainer) -> str:
    """The command that generates text from this run (printed when a run ends)."""
    cmd = ["python", "-m", "experiments.generate", "--run-dir", str(trainer.run_dir)]
    data = trainer.config.data
    if data.tokenizer == "gpt2" and data.data_dir:
        cmd += ["--data-dir", data.data_dir]
    prompt = "ROMEO:" if data.corpus == "tinyshakespeare" else "The"
    cmd += ["--prompt", prompt, "--max-new-tokens", "200"]
    return shlex.join(cmd)


def _make_trainer(run: RunConfig, run_dir: Path, args: argparse.Namespace) -> Trainer:
    """Build the trainer; the default corpus falls back to stdlib text when unavailable."""
    try:
        return Trainer(run, run_dir, resume=args.resume, sample_fn=make_sample_fn())
    except MissingDataError as err:
        if args.dataset is not None or args.resume:
            raise
        log.warning("%s; falling back to the %r corpus (no download needed)", err, "pydoc")
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, corpus=FALLBACK_DATASET))
        run_dir = (
            Path(args.run_dir)
            if args.run_dir
            else run_dir.with_name(f"{run.model.replace(':', '-')}-{FALLBACK_DATASET}")
        )
        return Trainer(run, run_dir, resume=False, sample_fn=make_sample_fn())


if __name__ == "__main__":
    sys.exit(main())
