"""The ``jaxbeta`` command line.

Exit codes: 0 on success, 2 on usage errors (argparse), 1 on bad data (the
validation message is printed, without a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources

__all__ = ["add_estimator_arguments", "main", "run_estimator", "sample_trace_path"]

SAMPLE_CHUNK_SIZE = 256


def sample_trace_path() -> str:
    """Path of the sample trace bundled with the package (C = 256)."""
    return str(resources.files("jaxbeta").joinpath("data", "sample_trace.csv"))


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference's estimator flags, shared by ``fit`` and examples/run.py."""
    parser.add_argument(
        "--algo",
        choices=("baseline", "iterative"),
        default="baseline",
        help="estimator (default: baseline)",
    )
    parser.add_argument(
        "--chunk-size",
        type=float,
        default=None,
        help="prefill tokens per engine step C (required unless fitting the "
        f"bundled sample, whose C is {SAMPLE_CHUNK_SIZE})",
    )
    parser.add_argument(
        "--min-duration-sec",
        type=float,
        default=0.0,
        help="clamp phase durations from below, seconds (default 0)",
    )
    parser.add_argument(
        "--correction-mode",
        default=None,
        help="partial-chunk correction: baseline end|uniform|none|end_inside "
        "(default end); iterative beta_informed|end|uniform|none|end_inside "
        "(default beta_informed)",
    )
    parser.add_argument(
        "--max-outer-iters", type=int, default=25, help="iterative: cap (25)"
    )
    parser.add_argument(
        "--tol", type=float, default=1e-6, help="iterative: tolerance (1e-6 s)"
    )
    parser.add_argument(
        "--damping-eta", type=float, default=1.0, help="iterative: eta (1.0)"
    )
    parser.add_argument(
        "--init-via-baseline-correction",
        default="end",
        help="iterative: correction of the baseline initialisation (end)",
    )


def run_estimator(args: argparse.Namespace, phases, chunk_size: float):
    """Runs the estimator that ``args`` select on ``phases``."""
    from jaxbeta import estimate_betas_baseline, estimate_betas_iterative

    if args.algo == "baseline":
        return estimate_betas_baseline(
            phases,
            chunk_size=chunk_size,
            min_duration_sec=args.min_duration_sec,
            correction_mode=args.correction_mode or "end",
        )
    return estimate_betas_iterative(
        phases,
        chunk_size=chunk_size,
        min_duration_sec=args.min_duration_sec,
        prefill_correction_mode=args.correction_mode or "beta_informed",
        max_outer_iters=args.max_outer_iters,
        tol=args.tol,
        damping_eta=args.damping_eta,
        init_via_baseline_correction=args.init_via_baseline_correction,
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    from jaxbeta._boundary import load_table
    from jaxbeta._report import format_result

    if args.chunk_size is None:
        raise _UsageError("--chunk-size is required")
    phases = load_table(args.path)
    result = run_estimator(args, phases, args.chunk_size)
    print(format_result(result))
    return 0


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxbeta",
        description="Estimate an LLM engine's step-time coefficients "
        "(beta0 s/step, beta1 s/prefill token, beta2 s/decode token) from "
        "request-level phase traces.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser(
        "fit",
        help="fit one trace",
        description="Fit one phase trace and print betas and diagnostics.",
    )
    fit.add_argument("path", help="phase table (CSV or Parquet)")
    add_estimator_arguments(fit)
    fit.set_defaults(handler=_cmd_fit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxbeta`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _UsageError as error:
        parser.error(str(error))
    except ValueError as error:
        print(f"jaxbeta: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
