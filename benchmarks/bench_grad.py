"""Cost of :func:`jaxbeta._sensitivity.sensitivity` relative to the fit itself.

Simulates one trace (``--n-requests`` requests, about two phases each), then
times, warm and interleaved in the same process, the iterative fit
(``estimate_betas_iterative``) and the per-phase sensitivity table
(``sensitivity``), both with the estimator's default settings. Prints the
median of ``--repeat`` runs of each and their ratio.

Example (100,000 phases, the simulator's defaults)::

    python benchmarks/bench_grad.py --n-requests 50000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Use the jaxbeta of this checkout, even if another copy is installed.
sys.path.insert(0, str(REPO_ROOT))
from jaxbeta._api import estimate_betas_iterative  # noqa: E402
from jaxbeta._sensitivity import sensitivity  # noqa: E402
from jaxbeta._simulate import simulate  # noqa: E402


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-requests", type=int, default=50_000)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    sim = simulate(args.n_requests, chunk_size=args.chunk_size, seed=args.seed)
    phases = sim.phases
    chunk = args.chunk_size

    def fit():
        return estimate_betas_iterative(phases, chunk_size=chunk)

    def table():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported below instead
            return sensitivity(phases, chunk_size=chunk)

    start = time.perf_counter()
    result = fit()
    fit_first = time.perf_counter() - start
    start = time.perf_counter()
    sens = table()
    table_first = time.perf_counter() - start

    fit_times, table_times = [], []
    for _ in range(args.repeat):
        fit_times.append(_timed(fit))
        table_times.append(_timed(table))
    fit_median = statistics.median(fit_times)
    table_median = statistics.median(table_times)

    print(
        f"trace: {len(phases)} phases, chunk_size {chunk}; fit: "
        f"{result.stop_reason} after {result.n_outer_iters} iterations"
    )
    print(
        f"sensitivity: gradient_valid={sens.attrs['gradient_valid']}, "
        f"adjoint products per beta {sens.attrs['adjoint_products']}"
    )
    print(f"first calls (with compilation): fit {fit_first:.2f} s, "
          f"sensitivity {table_first:.2f} s")  # fmt: skip
    print(
        f"warm, median of {args.repeat}: fit {fit_median:.3f} s, "
        f"sensitivity {table_median:.3f} s, ratio {table_median / fit_median:.2f}x"
    )
    # The fastest runs are the least disturbed by other load on the machine.
    fit_best, table_best = min(fit_times), min(table_times)
    print(
        f"warm, fastest of {args.repeat}: fit {fit_best:.3f} s, "
        f"sensitivity {table_best:.3f} s, ratio {table_best / fit_best:.2f}x"
    )


if __name__ == "__main__":
    main()
