"""Regenerate the bundled sample trace ``jaxbeta/data/sample_trace.csv``.

The file is exactly the phase table of::

    simulate(
        200,
        beta=(0.006, 3e-5, 1.5e-4),
        chunk_size=256,
        arrival="poisson",
        arrival_rate=8.0,
        prompt_dist=("lognormal", 400, 0.8, 1, 4096),
        output_dist=("lognormal", 128, 0.8, 1, 1024),
        noise_sigma=0.0,
        seed=20240601,
    )

written with ``DataFrame.to_csv(path, index=False)`` (full float precision).
About 200 requests and 400 phases at a moderate load (about 11 requests
running on average). ``tests/test_simulate.py`` checks that the bundled file
still equals this call, so rerun the script after any change to the simulator:

    python benchmarks/make_sample_trace.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRACE_PATH = REPO_ROOT / "jaxbeta" / "data" / "sample_trace.csv"

# Use the jaxbeta of this checkout, even if another copy is installed.
sys.path.insert(0, str(REPO_ROOT))
from jaxbeta._simulate import SimulationResult, simulate  # noqa: E402


def make_sample_trace() -> SimulationResult:
    """The simulation behind the bundled sample trace (see module docstring)."""
    return simulate(
        200,
        beta=(0.006, 3e-5, 1.5e-4),
        chunk_size=256,
        arrival="poisson",
        arrival_rate=8.0,
        prompt_dist=("lognormal", 400, 0.8, 1, 4096),
        output_dist=("lognormal", 128, 0.8, 1, 1024),
        noise_sigma=0.0,
        seed=20240601,
    )


def main() -> None:
    result = make_sample_trace()
    result.phases.to_csv(SAMPLE_TRACE_PATH, index=False)
    running = result.steps["n_running"]
    print(
        f"wrote {len(result.phases)} phases of {len(result.requests)} requests "
        f"to {SAMPLE_TRACE_PATH} (mean running {running.mean():.1f}, "
        f"max {running.max()})"
    )


if __name__ == "__main__":
    main()
