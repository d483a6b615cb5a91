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
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from experiments import equal_budget
from experiments.model_set import overrides_for, parse_models, parse_overrides
from qpf.config import ConfigError
from qpf.data import MissingDataError
from qpf.run_report import write_report
from qpf.training.trainer import TrainingDiverged

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
class Schedule(equal_budget.Schedule):
    """The shared step schedule derived from the token budget (``--tokens`` and friends)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Schedule:
        return cls.from_budget(args.tokens, args.batch_size, args.seq_len, args.eval_every_tokens)


def run_config(spec: str, preset: Any, args: argparse.Namespace, sched: Schedule, overrides):
    """One model's RunConfig; everything but the model is identical across models."""
    data, train = equal_budget.shared_sections(
        corpus=args.dataset,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        sched=sched,
        eval_batches=args.eval_batches,
    )
    return equal_budget.make_run(spec, preset.model, data, train, args.lr, overrides)


train_one = equal_budget.train_one
environment = equal_budget.environment


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
    equal_budget.plot_curves(results["models"], path)


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
            **equal_budget.budget_record(args, sched),
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
