"""Throughput of ``fit_many`` (vmapped buckets) against a loop of single fits.

Example (the figures in benchmarks/README.md)::

    python benchmarks/bench_batch.py --n-traces 1000 --device

The workload is ``--n-traces`` simulated traces of about 1,000 phases each
(``jaxbeta.simulate`` with 250-650 requests, varied arrival rates, chunk
sizes 128/256/512, half of them with step-time noise), so they fall in
several size buckets. It is generated once and cached as Parquet under
``benchmarks/out/`` (git-ignored).

Timed, in one run, with the iterative estimator and default settings:

- ``fit_many`` on all traces: the first call (compiles one program per
  bucket) and the best of ``--repeat`` warm calls;
- a Python loop of ``estimate_betas_iterative`` over all traces (after one
  untimed fit per bucket, so that it is warm too); ``--loop-traces N`` times
  only the first N and extrapolates linearly, for a quick look.

``--cpu-devices N`` splits the CPU into N XLA host devices (it sets
``XLA_FLAGS`` before JAX starts), so the batch is sharded over N devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"

CHUNK_SIZES = (128, 256, 512)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-traces", type=int, default=1000)
    parser.add_argument(
        "--loop-traces",
        type=int,
        default=None,
        help="time the loop on the first N traces only and extrapolate "
        "(default: all traces, no extrapolation)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="warm batch calls")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="number of XLA host devices to split the CPU into",
    )
    parser.add_argument(
        "--device", action="store_true", help="print jax.devices() first"
    )
    return parser.parse_args(argv)


def _workload(n_traces: int, seed: int):
    """Long phase table (``trace_id`` column) and chunk size per trace."""
    import numpy as np
    import pandas as pd

    from jaxbeta import simulate

    path = OUT_DIR / f"bench_batch_n{n_traces}_seed{seed}.parquet"
    if path.exists():
        table = pd.read_parquet(path)
    else:
        rng = np.random.default_rng(seed)
        frames = []
        for index in range(n_traces):
            chunk = int(rng.choice(CHUNK_SIZES))
            sim = simulate(
                int(rng.integers(250, 651)),
                chunk_size=chunk,
                arrival_rate=float(rng.uniform(4.0, 24.0)),
                noise_sigma=float(rng.choice([0.0, 0.05])),
                seed=seed * 1_000_003 + index,
            )
            frame = sim.phases.copy()
            frame.insert(0, "trace_id", f"t{index:05d}")
            frame["chunk_size"] = chunk
            frames.append(frame)
        table = pd.concat(frames, ignore_index=True)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        table.to_parquet(path)
    traces = {name: group for name, group in table.groupby("trace_id", sort=False)}
    chunk_sizes = {
        name: float(group["chunk_size"].iloc[0]) for name, group in traces.items()
    }
    return traces, chunk_sizes, path


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.cpu_devices:
        flag = f"--xla_force_host_platform_device_count={args.cpu_devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    # Use the jaxbeta of this checkout, even if another copy is installed.
    sys.path.insert(0, str(REPO_ROOT))
    import jax
    import numpy as np

    from jaxbeta import bucket_size, estimate_betas_iterative
    from jaxbeta._batch import DEFAULT_MAX_BATCH, fit_many

    if args.device:
        print(f"jax {jax.__version__}, devices: {jax.devices()}")
    print(f"host: {os.cpu_count()} CPU(s), load average {os.getloadavg()}")
    start = time.perf_counter()
    traces, chunk_sizes, path = _workload(args.n_traces, args.seed)
    sizes = np.array([len(t) for t in traces.values()])
    buckets = {}
    for name, table in traces.items():
        buckets.setdefault(bucket_size(len(table)), []).append(name)
    print(
        f"workload: {len(traces)} traces from {path.name} "
        f"({time.perf_counter() - start:.1f} s to load/generate), phases per "
        f"trace min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()}; "
        "buckets "
        + ", ".join(f"{size}: {len(names)}" for size, names in sorted(buckets.items()))
    )
    max_batch = args.max_batch or DEFAULT_MAX_BATCH

    def run_batch():
        return fit_many(
            traces, chunk_size=chunk_sizes, progress=False, max_batch=max_batch
        )

    start = time.perf_counter()
    results = run_batch()
    first = time.perf_counter() - start
    warm = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        results = run_batch()
        warm = min(warm, time.perf_counter() - start)
    failed = int((results["error"] != "").sum())
    iters = results["n_outer_iters"].dropna().astype(int)
    print(
        f"fit_many (max_batch {max_batch}): first call {first:.1f} s (includes "
        f"compiling {len(buckets)} bucket programs); warm best of {args.repeat}: "
        f"{warm:.2f} s = {len(traces) / warm:.1f} traces/s; {failed} failed; "
        f"outer iterations mean {iters.mean():.1f}, max {iters.max()}"
    )

    # Warm the single-trace path: one untimed fit per bucket compiles it.
    for names in buckets.values():
        name = names[0]
        estimate_betas_iterative(traces[name], chunk_size=chunk_sizes[name])
    subset = list(traces)[: args.loop_traces or len(traces)]
    start = time.perf_counter()
    for name in subset:
        estimate_betas_iterative(traces[name], chunk_size=chunk_sizes[name])
    loop = time.perf_counter() - start
    per_trace = loop / len(subset)
    extrapolated = per_trace * len(traces)
    extrapolation = (
        f"; extrapolated (linearly, not measured) to {len(traces)} traces: "
        f"{extrapolated:.1f} s"
        if len(subset) < len(traces)
        else ""
    )
    print(
        f"loop of estimate_betas_iterative: {len(subset)} traces timed in "
        f"{loop:.2f} s = {1 / per_trace:.1f} traces/s{extrapolation}"
    )
    print(f"ratio (loop / warm batch): {extrapolated / warm:.2f}x")


if __name__ == "__main__":
    main()
