"""Speed of the baseline estimator against a NumPy sort of the same trace.

For traces of 1e3 .. 1e6 phases (simulated, moderate load), prints the first
call of ``estimate_betas_baseline`` (compilation included), the median of
several warm calls, and, in the same run, the median time NumPy takes to sort
the trace's 2n timestamps. The ratio warm / sort is the figure of merit (the
issue's target: <= 5 at 1e6 phases; first call <= warm + 10 s).

    python benchmarks/bench_baseline.py [--sizes 1000 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jaxbeta  # noqa: E402

CHUNK_SIZE = 512


def make_trace(n_phases: int, seed: int = 0):
    """A simulated trace of about ``n_phases`` rows (two per request)."""
    n_requests = max(n_phases // 2, 2)
    result = jaxbeta.simulate(
        n_requests,
        chunk_size=CHUNK_SIZE,
        arrival_rate=16.0,
        prompt_dist=("lognormal", 400, 0.8, 1, 4096),
        output_dist=("lognormal", 128, 0.8, 2, 1024),
        seed=seed,
    )
    return result.phases


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    print(f"{'phases':>9} {'first s':>9} {'warm s':>9} {'sort s':>9} {'warm/sort':>9}")
    for size in args.sizes:
        phases = make_trace(size)
        timestamps = np.concatenate(
            [phases["t_start"].to_numpy(), phases["t_end"].to_numpy()]
        )

        def fit(phases=phases):
            return jaxbeta.estimate_betas_baseline(phases, chunk_size=CHUNK_SIZE)

        start = time.perf_counter()
        fit()
        first = time.perf_counter() - start
        warm = median_time(fit, args.repeats)
        sort = median_time(lambda t=timestamps: np.sort(t), max(args.repeats, 5))
        print(
            f"{len(phases):>9} {first:>9.3f} {warm:>9.3f} {sort:>9.4f} "
            f"{warm / sort:>9.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
