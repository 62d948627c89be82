"""Fit one phase trace with the reference's command-line flags.

    python examples/run.py                       # the bundled sample trace
    python examples/run.py --csv trace.csv --chunk-size 64
    python examples/run.py --csv trace.csv --chunk-size 64 --algo iterative \
        --correction-mode beta_informed --damping-eta 1.0
    python examples/run.py --csv trace.csv --chunk-size 64 --algo recommended
"""

from __future__ import annotations

import argparse
import sys

from jaxbeta._report import format_result
from jaxbeta.cli import (
    SAMPLE_CHUNK_SIZE,
    add_estimator_arguments,
    run_estimator,
    sample_trace_path,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--csv", default=None, help="phase table (default: the bundled sample)"
    )
    add_estimator_arguments(parser, algos=("baseline", "iterative", "recommended"))
    args = parser.parse_args(argv)
    csv = args.csv or sample_trace_path()
    chunk_size = args.chunk_size
    if chunk_size is None:
        if args.csv is not None:
            parser.error("--chunk-size is required with --csv")
        chunk_size = SAMPLE_CHUNK_SIZE
    try:
        result = run_estimator(args, csv, chunk_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"trace: {csv} (chunk size {chunk_size:g})")
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
