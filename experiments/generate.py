"""Generate text from a trained run: ``python -m experiments.generate --run-dir DIR --prompt TEXT``.

The continuation is streamed to stdout as it is generated (status lines go to stderr). The
prompt (``--prompt`` or ``--prompt-file``, any length) is prefilled ``--chunk-size`` tokens
at a time with the carried state, so memory stays flat for recurrent models; the
transformer's KV cache must hold prompt + new tokens within its max_len. A prompt longer
than one chunk reports prefill progress on stderr, and each sample ends with a line saying
why it stopped (end-of-text or --max-new-tokens). Every fault (a bad option, a missing or
damaged run) exits with status 2 and one ``error:`` line on stderr; ``--debug`` or
``QPF_DEBUG=1`` shows tracebacks. Nothing in the run directory is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.cli import run_main, setup_logging
from qpf.config import ConfigError
from qpf.generation.from_run import DEFAULT_CHUNK, GenerateOptions, stream_loaded
from qpf.ops.sampling import SamplingConfig
from qpf.training.restore import CHECKPOINT_CHOICES, load_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__)
    p.add_argument("--run-dir", required=True, help="a run directory of experiments.train")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text ('' = start from BOS)")
    src.add_argument("--prompt-file", type=Path, default=None, help="read the prompt (UTF-8)")
    p.add_argument(
        "--checkpoint",
        choices=CHECKPOINT_CHOICES,
        default="latest",
        help="latest (default) or best (lowest validation loss)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--num-samples", type=int, default=1, help="samples sharing one prefill")
    p.add_argument("--beam-width", type=int, default=1, help="> 1: beam search (deterministic)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam ranking exponent")
    p.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK, help="prompt tokens per prefill call"
    )
    p.add_argument(
        "--block-size", type=int, default=1, help="tokens per compiled decode call (latency)"
    )
    p.add_argument("--data-dir", default=None, help="tokenizer data folder (GPT-2 ranks)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also QPF_DEBUG=1)")
    return p.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompt-file {args.prompt_file}: {err}") from err


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    """Validate every generation option before the (slow) checkpoint load."""
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    return GenerateOptions(
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        beam_width=args.beam_width,
        length_penalty=args.length_penalty,
        num_samples=args.num_samples,
        chunk_size=args.chunk_size,
        block_size=args.block_size,
    )


def _status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return run_main(lambda: _main(args), argv)


def _main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    prompt = read_prompt(args)
    run = load_run(args.run_dir, args.checkpoint, args.data_dir)
    _status(f"loaded {run.config.model} step {run.step} ({args.checkpoint}) from {run.run_dir}")

    def report(text: str) -> None:
        # A sample's end (its stop reason) also ends its text on stdout with one newline.
        if not text.startswith("prefill"):
            print(flush=True)
        _status(text)

    for index, piece in stream_loaded(run, prompt, options, report=report):
        if not piece:  # a sample starts
            if options.num_samples > 1:
                print(f"--- sample {index} ---", flush=True)
            continue
        sys.stdout.write(piece)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
