"""Build a self-contained HTML report of one or more training runs.

    python -m experiments.report --run-dir runs/a [--run-dir runs/b ...] [--out report.html]

The page (one file, figures embedded) holds each run's config, learning curves against
tokens and wall time (runs overlaid), the Manas/Buddhi/Viveka/Smriti metrics over time,
per-module gradient norms and update ratios, the recurrence eigenvalues on the unit
circle, coupler routing and memory slot usage on a probe text, embedding phase plots,
throughput and the samples of each evaluation. Written to RUN/report.html (the first run)
unless --out says otherwise; open it in any browser.
"""

from __future__ import annotations

import argparse
import sys

from qpf.run_report import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__)
    p.add_argument("--run-dir", action="append", required=True, help="a run directory (repeat)")
    p.add_argument("--out", default=None, help="output HTML file (default RUN/report.html)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
