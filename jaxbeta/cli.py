"""The ``jaxbeta`` command line.

Exit codes: 0 on success, 2 on usage errors (argparse), 1 on bad data (the
validation message is printed, without a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources

__all__ = [
    "add_estimator_arguments",
    "estimator_options",
    "main",
    "run_estimator",
    "sample_trace_path",
]

SAMPLE_CHUNK_SIZE = 256


def sample_trace_path() -> str:
    """Path of the sample trace bundled with the package (C = 256)."""
    return str(resources.files("jaxbeta").joinpath("data", "sample_trace.csv"))


# Loop flags of the iterative estimators; a flag left unset is not passed,
# so each estimator keeps its own default (the reference's for
# ``iterative``, ``jaxbeta.fit``'s for ``recommended``).
_LOOP_FLAGS = ("max_outer_iters", "tol", "damping_eta", "init_via_baseline_correction")


def add_estimator_arguments(
    parser: argparse.ArgumentParser,
    algos: Sequence[str] = ("baseline", "iterative"),
) -> None:
    """The reference's estimator flags, shared by ``fit``, ``fit-many`` and
    examples/run.py; ``algos`` are the ``--algo`` choices."""
    helps = {
        "baseline": "baseline: the reference's time-integrated NNLS",
        "iterative": "iterative: the reference's MM reweighting",
        "recommended": "recommended: jaxbeta.fit, the MM fixed point with the "
        "options chosen on benchmarks/ACCURACY.md",
    }
    parser.add_argument(
        "--algo",
        choices=tuple(algos),
        default="baseline",
        help="estimator (default: baseline); "
        + "; ".join(helps[algo] for algo in algos),
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
        "--max-outer-iters",
        type=int,
        default=None,
        help="iterative: iteration cap (default 25; recommended: 100)",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=None,
        help="iterative: tolerance (default 1e-6 s on ||delta beta||; "
        "recommended: 1e-9 relative)",
    )
    parser.add_argument(
        "--damping-eta",
        type=float,
        default=None,
        help="iterative: damping eta (default 1.0)",
    )
    parser.add_argument(
        "--init-via-baseline-correction",
        default=None,
        help="iterative: correction of the baseline initialisation (default "
        "end; recommended: end_inside)",
    )
    if "recommended" in algos:
        parser.add_argument(
            "--max-num-batched-tokens",
            type=float,
            default=None,
            help="iterative, recommended: the engine's per-step token budget "
            "(vLLM max_num_batched_tokens), if it can bind (default: none)",
        )


def estimator_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of the estimator that ``args.algo`` selects."""
    budget = getattr(args, "max_num_batched_tokens", None)
    if budget is not None and args.algo == "baseline":
        raise ValueError(
            "--max-num-batched-tokens is an option of --algo iterative and "
            "--algo recommended, not of the baseline"
        )
    if args.algo == "baseline":
        return {"correction_mode": args.correction_mode or "end"}
    given = {name: getattr(args, name) for name in _LOOP_FLAGS}
    given = {name: value for name, value in given.items() if value is not None}
    if args.correction_mode is not None:
        given["prefill_correction_mode"] = args.correction_mode
    if budget is not None:
        given["max_num_batched_tokens"] = budget
    return given


def run_estimator(args: argparse.Namespace, phases, chunk_size: float):
    """Runs the estimator that ``args`` select on ``phases``."""
    from jaxbeta import estimate_betas_baseline, estimate_betas_iterative, fit

    estimator = {
        "baseline": estimate_betas_baseline,
        "iterative": estimate_betas_iterative,
        "recommended": fit,
    }[args.algo]
    return estimator(
        phases,
        chunk_size=chunk_size,
        min_duration_sec=args.min_duration_sec,
        **estimator_options(args),
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    from jaxbeta._io import read_trace
    from jaxbeta._report import format_result

    if args.chunk_size is None:
        raise _UsageError("--chunk-size is required")
    phases = read_trace(args.path, format=args.format, time_unit=args.time_unit)
    result = run_estimator(args, phases, args.chunk_size)
    print(format_result(result))
    if args.json:
        from jaxbeta._export import write_json

        write_json(result, args.json, phases=phases)
        print(f"wrote {args.json}")
    if args.yaml:
        from jaxbeta._export import write_yaml

        write_yaml(result, args.yaml, phases=phases)
        print(f"wrote {args.yaml}")
    if args.blis:
        from jaxbeta._export import blis_cli_args, write_blis

        alphas = tuple(float(a) for a in args.alpha_coeffs.split(","))
        write_blis(
            result,
            args.blis,
            model_id=args.model_id,
            gpu=args.gpu,
            tensor_parallelism=args.tensor_parallelism,
            vllm_version=args.vllm_version,
            alpha_coeffs=alphas,
        )
        print(f"wrote {args.blis}")
        print("BLIS flags: " + blis_cli_args(result, alpha_coeffs=alphas))
    if args.plot:
        from jaxbeta._plot import plot_fit

        plot_fit(result, phases, path=args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_fit_many(args: argparse.Namespace) -> int:
    from jaxbeta._batch import run_fit_many

    return run_fit_many(args)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from jaxbeta._simulate import run_simulate

    return run_simulate(args)


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
    fit.add_argument(
        "path",
        help="trace file: phase table (CSV, Parquet, JSONL), vLLM OTLP spans "
        "(JSON/JSONL) or vllm bench serve results (JSON)",
    )
    fit.add_argument(
        "--format",
        default="auto",
        choices=("auto", "csv", "parquet", "jsonl", "json", "otlp", "vllm-bench"),
        help="input format (default: from the extension and content)",
    )
    fit.add_argument(
        "--time-unit",
        default="s",
        choices=("s", "ms", "us", "ns"),
        help="unit of t_start/t_end in phase tables (default s)",
    )
    add_estimator_arguments(fit, algos=("baseline", "iterative", "recommended"))
    exports = fit.add_argument_group("exports")
    exports.add_argument("--json", metavar="OUT", help="write the fit record (JSON)")
    exports.add_argument("--yaml", metavar="OUT", help="write the fit record (YAML)")
    exports.add_argument(
        "--blis", metavar="OUT", help="write a BLIS blackbox model entry (YAML)"
    )
    exports.add_argument("--model-id", default="jaxbeta-fit", help="BLIS model id")
    exports.add_argument("--gpu", default="H100", help="BLIS GPU name")
    exports.add_argument(
        "--tensor-parallelism", type=int, default=1, help="BLIS tensor parallelism"
    )
    exports.add_argument("--vllm-version", default="", help="BLIS vLLM version")
    exports.add_argument(
        "--alpha-coeffs",
        default="0,0,0",
        help="BLIS alpha coefficients (not estimated here), comma-separated",
    )
    exports.add_argument("--plot", metavar="OUT", help="write a diagnostic PNG")
    fit.set_defaults(handler=_cmd_fit)

    from jaxbeta._batch import add_fit_many_arguments

    many = commands.add_parser(
        "fit-many",
        help="fit many traces in batched, vmapped calls",
        description="Fit every trace in a directory (or one long table with a "
        "trace-id column), one compiled vmapped program per size bucket.",
    )
    add_fit_many_arguments(many)
    many.set_defaults(handler=_cmd_fit_many)

    from jaxbeta._simulate import add_simulate_arguments

    sim = commands.add_parser(
        "simulate",
        help="simulate a ground-truth trace",
        description="Simulate a continuous-batching engine with known betas "
        "and write its phase table.",
    )
    add_simulate_arguments(sim)
    sim.set_defaults(handler=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxbeta`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _UsageError as error:
        parser.error(str(error))
    except (ValueError, OSError) as error:
        print(f"jaxbeta: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
