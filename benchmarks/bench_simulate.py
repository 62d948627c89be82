"""Time :func:`jaxbeta._simulate.simulate` on a large workload.

Example (100,000 requests, about 50 running on average with default betas)::

    python benchmarks/bench_simulate.py --n-requests 100000 --arrival-rate 16

Prints the best wall time over ``--repeat`` runs, the number of engine steps
and the mean number of running requests per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Use the jaxbeta of this checkout, even if another copy is installed.
sys.path.insert(0, str(REPO_ROOT))
from jaxbeta._simulate import simulate  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-requests", type=int, default=100_000)
    parser.add_argument("--arrival-rate", type=float, default=16.0)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--noise-sigma", type=float, default=0.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = simulate(
            args.n_requests,
            chunk_size=args.chunk_size,
            arrival_rate=args.arrival_rate,
            noise_sigma=args.noise_sigma,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
        )
        best = min(best, time.perf_counter() - start)
    steps = result.steps
    print(
        f"{args.n_requests} requests: best of {args.repeat} = {best:.2f} s; "
        f"{len(steps)} steps, {len(result.phases)} phases, "
        f"mean running {steps['n_running'].mean():.1f}"
    )


if __name__ == "__main__":
    main()
