"""Train several model families on the same data and token budget, and compare them.

    python -m experiments.compare --models qpf:tiny-byte,transformer:tiny-byte,diagrnn:tiny-byte \
        --dataset tinystories --tokens 300000 --out runs/compare

Every model trains with the shared ``Trainer`` on the same ``DataConfig`` (corpus,
tokenizer, sequence length, batch size, seed: the same batches in the same order) for
``tokens // (batch_size * seq_len)`` optimizer steps, and is evaluated on the same
validation batches at the same token counts (before training too). Each model's run lives in
``OUT/<family>-<preset>/`` (config, metrics.jsonl, final checkpoint). The comparison writes

* ``OUT/results.json``: per model the final validation loss / perplexity / bits per byte,
  the validation curve, the train-loss curve and the wall-clock;
* ``OUT/results.md``: the same as markdown tables, with where and when it ran;
* ``OUT/curves.png``: validation and train loss against tokens seen;
* ``OUT/report.html``: the run report (``experiments.report``) of all models overlaid.

Learning rates are each preset's own unless ``--lr``. Overrides use
``--set [SCOPE:]SECTION.FIELD=VALUE`` (see ``experiments.model_set``), e.g.
``--set qpf:model.backbone.num_layers=2`` or ``--set optim.warmup_steps=20``.
The defaults (byte tokenizer, T=128, batch 16, 300k tokens) take roughly 15 minutes on
a 2-core CPU with the TinyStories slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax

from experiments.model_set import overrides_for, parse_models, parse_overrides
from qpf.config import ConfigError
from qpf.data import DataConfig, MissingDataError
from qpf.run_report import write_report
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.metrics import read_metrics
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig
from qpf.training.trainer import Trainer, TrainingDiverged, peak_lr

# The byte presets are parameter-matched (about 0.7M each) for the default byte tokenizer;
# the BPE "tiny" presets would shrink to very different sizes with a 259-token vocabulary.
DEFAULT_MODELS = "qpf:tiny-byte,transformer:tiny-byte,diagrnn:tiny-byte"
DEFAULT_TOKENS = 300_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.compare", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated FAMILY:PRESET")
    ap.add_argument("--dataset", default="tinystories", help="corpus (see qpf.data)")
    ap.add_argument("--tokenizer", default="byte", help="byte (default), gpt2")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="train tokens per model")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--eval-every-tokens", type=int, default=None, help="default: a fifth of --tokens"
    )
    ap.add_argument(
        "--eval-batches", type=int, default=16, help="validation batches (0 = whole split)"
    )
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: each preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default runs/compare-DATASET")
    ap.add_argument("--data-dir", default=None, help="corpus folder (default $QPF_DATA_DIR)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[SCOPE:]SECTION.FIELD=VALUE",
        help="config override (repeatable): model.dim=32, qpf:model.backbone.num_layers=2",
    )
    return ap.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The shared step schedule derived from the token budget."""

    tokens_per_step: int
    steps: int
    eval_every: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Schedule:
        per_step = args.batch_size * args.seq_len
        steps = args.tokens // per_step
        if steps < 1:
            raise ConfigError(
                f"--tokens {args.tokens} is less than one step "
                f"({args.batch_size} x {args.seq_len} = {per_step} tokens)"
            )
        every_tokens = args.eval_every_tokens or args.tokens // 5
        return cls(per_step, steps, max(1, min(steps, every_tokens // per_step)))


def run_config(spec: str, preset: Any, args: argparse.Namespace, sched: Schedule, overrides):
    """One model's RunConfig; everything but the model is identical across models."""
    data = DataConfig(
        corpus=args.dataset,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    train = TrainConfig(
        steps=sched.steps,
        eval_every=sched.eval_every,
        eval_batches=args.eval_batches,
        save_every=0,  # only the final checkpoint: saving is not what is being compared
        log_every=max(1, sched.steps // 50),
        seed=args.seed,
        sample_tokens=0,
        tensorboard=False,
        progress=False,
    )
    run = RunConfig(spec, preset.model, data, OptimConfig(lr=args.lr), LossConfig(), train)
    run = run.with_overrides(overrides)
    for section, value in (("data", data), ("train", train)):
        # The comparison is only fair when these stay shared; their flags set them.
        if getattr(run, section) != value:
            raise ConfigError(
                f"--set {section}.*: data and train settings must be equal for all models; "
                "use --seq-len, --batch-size, --tokens, --eval-every-tokens, --dataset instead"
            )
    return run


def train_one(spec: str, run: RunConfig, run_dir: Path, sched: Schedule) -> dict[str, Any]:
    """Train one model; returns its final metrics, curves and timings."""
    t0 = time.perf_counter()
    trainer = Trainer(run, run_dir)
    try:
        setup_s = time.perf_counter() - t0
        initial = trainer.evaluate(trainer.state.params)
        if trainer.logger:
            trainer.logger.log(0, initial)
        t1 = time.perf_counter()
        result = trainer.run()
        train_s = time.perf_counter() - t1
    finally:
        trainer.close()
    params = sum(int(x.size) for x in jax.tree.leaves(result.params))
    records = read_metrics(run_dir)
    val_curve = [
        {"step": r["step"], "tokens": r["step"] * sched.tokens_per_step, "val_loss": r["val/loss"]}
        for r in records
        if "val/loss" in r
    ]
    train_curve = [
        {
            "step": r["step"],
            "tokens": r["step"] * sched.tokens_per_step,
            "train_loss": r["train/loss"],
        }
        for r in records
        if "train/loss" in r
    ]
    vocab = trainer.config.model_config.vocab_size
    return {
        "model": spec,
        "params": params,
        "vocab_size": vocab,
        "lr": peak_lr(trainer.config),
        "steps": result.step,
        "tokens": result.step * sched.tokens_per_step,
        "val_loss": result.val["val/loss"],
        "val_ppl": result.val["val/ppl"],
        "val_bpb": result.val["val/bpb"],
        "initial_val_loss": initial["val/loss"],
        "ln_vocab": math.log(vocab),
        "val_curve": val_curve,
        "train_curve": train_curve,
        "setup_s": setup_s,
        "train_s": train_s,
        "train_tokens_per_s": result.step * sched.tokens_per_step / train_s,
        "run_dir": str(run_dir),
    }


def environment() -> dict[str, Any]:
    """Where and when the comparison ran (for the results header)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def markdown(results: dict[str, Any]) -> str:
    """The results table, the validation curve table and the run header."""
    env, cfg, models = results["environment"], results["config"], results["models"]
    first = models[0]
    lines = [
        f"Ran {env['date']} on {env['device']} ({env['platform']}, {env['cpu_count']} CPUs), "
        f"jax {env['jax_version']}; other processes may have shared the machine.",
        f"Data: {cfg['dataset']} ({cfg['tokenizer']} tokenizer), T={cfg['seq_len']}, "
        f"batch {cfg['batch_size']}, {cfg['steps']} steps = {cfg['tokens']:,} tokens per model, "
        f"seed {cfg['seed']}, {cfg['eval_batches'] or 'all'} validation batches.",
        f"Total wall-clock: {results['wall_s']:.0f} s.",
        "",
        "| model | params | lr | val loss | val PPL | x first | val bpb | initial loss | "
        "train s | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        lines.append(
            f"| {m['model']} | {m['params']:,} | {m['lr']:g} | {m['val_loss']:.4f} | "
            f"{m['val_ppl']:.3f} | {m['val_ppl'] / first['val_ppl']:.2f} | {m['val_bpb']:.4f} | "
            f"{m['initial_val_loss']:.3f} | {m['train_s']:.0f} | "
            f"{m['train_tokens_per_s']:,.0f} |"
        )
    lines += [
        "",
        "Validation loss at equal token counts:",
        "",
        "| tokens | " + " | ".join(m["model"] for m in models) + " |",
        "|---:|" + "---:|" * len(models),
    ]
    for i, point in enumerate(first["val_curve"]):
        cells = [f"{m['val_curve'][i]['val_loss']:.4f}" for m in models]
        lines.append(f"| {point['tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation and train loss against tokens seen, one line per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display; write files only
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    for m in results["models"]:
        ax_val.plot(
            [p["tokens"] for p in m["val_curve"]],
            [p["val_loss"] for p in m["val_curve"]],
            marker="o",
            label=m["model"],
        )
        ax_train.plot(
            [p["tokens"] for p in m["train_curve"]],
            [p["train_loss"] for p in m["train_curve"]],
            label=m["model"],
        )
    for ax, title in ((ax_val, "validation loss"), (ax_train, "train loss")):
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = parse_models(args.models)
    specs = [spec for spec, _, _ in models]
    overrides = parse_overrides(args.set, specs)
    sched = Schedule.from_args(args)
    # Build every config before training any model, so a bad option fails at once.
    runs = [
        (spec, run_config(spec, preset, args, sched, overrides_for(spec, overrides)))
        for spec, _family, preset in models
    ]
    out = args.out or Path("runs") / f"compare-{args.dataset}"
    for spec, _ in runs:
        # A previous comparison's run would make the Trainer refuse (or mix two runs' logs).
        if (out / spec.replace(":", "-")).exists():
            raise ConfigError(f"{out / spec.replace(':', '-')} exists: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trained = []
    for spec, run_cfg in runs:
        print(f"training {spec}: {sched.steps} steps", flush=True)
        record = train_one(spec, run_cfg, out / spec.replace(":", "-"), sched)
        print(
            f"{spec}: val loss {record['val_loss']:.4f}  ppl {record['val_ppl']:.3f}  "
            f"bpb {record['val_bpb']:.4f}  ({record['train_s']:.0f} s)",
            flush=True,
        )
        trained.append(record)
    results = {
        "environment": environment(),
        "config": {
            "models": specs,
            "dataset": args.dataset,
            "tokenizer": args.tokenizer,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "steps": sched.steps,
            "tokens": sched.steps * sched.tokens_per_step,
            "eval_every_steps": sched.eval_every,
            "eval_batches": args.eval_batches,
            "seed": args.seed,
            "lr": args.lr,
            "set": args.set,
        },
        "wall_s": time.perf_counter() - t0,
        "models": trained,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    plot(results, out / "curves.png")
    write_report([out / spec.replace(":", "-") for spec in specs], out / "report.html")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        results = run(args)
    except (ConfigError, MissingDataError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
