"""Train a qpf (or baseline) language model: ``python -m experiments.train [options]``.

With no options it trains the tiny preset on TinyShakespeare in a few CPU minutes (falling
back to the Python standard library's English text when the corpus is neither on disk nor
downloadable). See the README for every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from qpf.config import ConfigError
from qpf.data import DataConfig, MissingDataError
from qpf.generation.train_sample import make_sample_fn
from qpf.models.family import resolve_model
from qpf.training import distributed as dist
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig
from qpf.training.trainer import Trainer, TrainingDiverged

DEFAULT_DATASET = "tinyshakespeare"
FALLBACK_DATASET = "pydoc"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__)
    p.add_argument("--model", default="qpf", help="model family: qpf, transformer, diagrnn")
    p.add_argument("--preset", default="tiny", help="preset name, or FAMILY:PRESET")
    p.add_argument("--dataset", default=None, help=f"corpus (default {DEFAULT_DATASET})")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (default; the model's vocabulary follows the tokenizer), gpt2, morphological",
    )
    p.add_argument("--data-dir", default=None, help="corpus folder (default $QPF_DATA_DIR)")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/MODEL-DATASET)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None, help="0 = whole validation split")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
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


def build_config(args: argparse.Namespace) -> RunConfig:
    """A fresh run's config from the preset, the flags and the --set overrides."""
    spec = args.preset if ":" in args.preset else f"{args.model}:{args.preset}"
    _family, preset = resolve_model(spec)
    data = DataConfig(
        corpus=args.dataset or DEFAULT_DATASET,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len or 128,
        batch_size=args.batch_size or preset.batch_size,
        seed=args.seed or 0,
        data_dir=args.data_dir,
    )
    model_config = preset.model
    if args.dtype:
        model_config = dataclasses.replace(model_config, dtype=args.dtype)
    optim = OptimConfig(lr=args.lr, grad_accum=args.grad_accum or 1)
    train = TrainConfig(
        steps=args.steps or 300,
        eval_every=args.eval_every if args.eval_every is not None else 100,
        eval_batches=args.eval_batches if args.eval_batches is not None else 20,
        save_every=args.save_every if args.save_every is not None else 100,
        log_every=args.log_every or 10,
        seed=args.seed or 0,
        data_parallel=args.data_parallel,
        profile_steps=args.profile_steps or "",
        progress=not args.no_progress,
    )
    run = RunConfig(spec, model_config, data, optim, LossConfig(), train)
    return run.with_overrides(_overrides(args.set))


def resume_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """The saved config of ``run_dir`` with this invocation's loop options applied."""
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"--resume: {path} not found; is {run_dir} a training run directory?")
    run = RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    loop = {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_batches": args.eval_batches,
        "save_every": args.save_every,
        "log_every": args.log_every,
        "profile_steps": args.profile_steps,
    }
    train = dataclasses.replace(
        run.train,
        **{k: v for k, v in loop.items() if v is not None},
        progress=not args.no_progress,
        data_parallel=args.data_parallel or run.train.data_parallel,
    )
    run = dataclasses.replace(run, train=train)
    if args.data_dir:
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, data_dir=args.data_dir))
    return run.with_overrides(_overrides(args.set))


def _quiet_libraries() -> None:
    # Orbax and Grain log every save/restore through absl at INFO; keep the console readable.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("absl", "jax._src.xla_bridge", "orbax", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = parse_args(argv)
    try:
        dist.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        run_dir = Path(args.run_dir) if args.run_dir else None
        if args.resume:
            if run_dir is None:
                raise ConfigError("--resume needs --run-dir (the run to continue)")
            run = resume_config(args, run_dir)
        else:
            run = build_config(args)
            run_dir = run_dir or Path("runs") / f"{run.model.replace(':', '-')}-{run.data.corpus}"
        trainer = _make_trainer(run, run_dir, args)
    except (ConfigError, MissingDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = trainer.config
    print(f"run directory: {trainer.run_dir}  (model {cfg.model}, corpus {cfg.data.corpus})")
    try:
        result = trainer.run()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if result.val:
        print(
            f"done: step {result.step}, val loss {result.val['val/loss']:.4f}, "
            f"ppl {result.val['val/ppl']:.2f}, bpb {result.val['val/bpb']:.4f}"
        )
    return 0


def _make_trainer(run: RunConfig, run_dir: Path, args: argparse.Namespace) -> Trainer:
    """Build the trainer; the default corpus falls back to stdlib text when unavailable."""
    try:
        return Trainer(run, run_dir, resume=args.resume, sample_fn=make_sample_fn())
    except MissingDataError as err:
        if args.dataset is not None or args.resume:
            raise
        logging.warning("%s\nfalling back to the %r corpus (no download needed)", err, "pydoc")
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, corpus=FALLBACK_DATASET))
        run_dir = (
            Path(args.run_dir)
            if args.run_dir
            else run_dir.with_name(f"{run.model.replace(':', '-')}-{FALLBACK_DATASET}")
        )
        return Trainer(run, run_dir, resume=False, sample_fn=make_sample_fn())


if __name__ == "__main__":
    sys.exit(main())
