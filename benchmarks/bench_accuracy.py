"""Accuracy of every estimator configuration on a fixed grid of simulated traces.

Simulates the 648 traces of ``benchmarks/accuracy_grid.py`` (known betas),
fits each with the reference-compatible configurations and with jaxbeta's
options, and reports per configuration the relative error of each beta
(median, 90th percentile, max), the share of fits that converge and the
iterations used, overall and on subsets of the grid. Writes the tables to
``benchmarks/ACCURACY.md``.

Command (about 2 minutes on 2 idle CPU cores, 7 under load)::

    python benchmarks/bench_accuracy.py

``--limit N`` fits only every k-th cell (N cells in all) for a quick look;
the Markdown file is then written only if ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# Use the jaxbeta of this checkout, even if another copy is installed.
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_grid as grid  # noqa: E402
import jax  # noqa: E402

from jaxbeta._baseline import fit_baseline_arrays  # noqa: E402
from jaxbeta._boundary import prepare_trace  # noqa: E402
from jaxbeta._iterative import fit_iterative_arrays  # noqa: E402
from jaxbeta._recommended import RECOMMENDED, ROW_WEIGHTS, fit  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "ACCURACY.md"
BETA_NAMES = ("beta0", "beta1", "beta2")
JAXBETA_TOL = 1e-9
COMPILE_THREADS = 2  # relative stop rule of the jaxbeta configurations


@dataclasses.dataclass(frozen=True)
class Config:
    """One estimator configuration of the benchmark."""

    name: str
    family: str  # "reference-compatible" or "jaxbeta"
    kind: str  # "baseline", "iterative" or "fit"
    options: dict
    # fit only: pass the engine's token budget (max_num_batched_tokens=B,
    # part of the engine's configuration like C; None on cells without one).
    engine_budget: bool = True

    def describe(self) -> str:
        if self.kind == "oracle":
            return "see below"
        if self.kind == "fit":
            budget = ", max_num_batched_tokens=B" if self.engine_budget else ""
            extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
            note = "" if extra else " (all defaults)"
            return f"`jaxbeta.fit(phases, chunk_size=C{budget}{extra})`{note}"
        call = (
            "estimate_betas_baseline"
            if self.kind == "baseline"
            else "estimate_betas_iterative"
        )
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"`{call}({args})`" if args else f"`{call}()` (defaults)"


def _jaxbeta_iterative(name: str, **options) -> Config:
    base = {
        "stop_rule": "relative",
        "tol": JAXBETA_TOL,
        # Picard may need many iterations; the accelerated solvers do not.
        "max_outer_iters": 200 if options.get("solver", "picard") == "picard" else 100,
    }
    return Config(name, "jaxbeta", "iterative", {**base, **options})


END_INSIDE = {
    "prefill_correction_mode": "end_inside",
    "init_via_baseline_correction": "end_inside",
}

CONFIGS = (
    Config("ref baseline end", "reference-compatible", "baseline", {}),
    Config(
        "ref baseline uniform",
        "reference-compatible",
        "baseline",
        {"correction_mode": "uniform"},
    ),
    Config(
        "ref baseline none",
        "reference-compatible",
        "baseline",
        {"correction_mode": "none"},
    ),
    Config("ref iterative 25", "reference-compatible", "iterative", {}),
    Config(
        "ref iterative 200",
        "reference-compatible",
        "iterative",
        {"max_outer_iters": 200},
    ),
    Config(
        "ref iterative eta0.5",
        "reference-compatible",
        "iterative",
        {"damping_eta": 0.5},
    ),
    Config(
        "baseline end_inside", "jaxbeta", "baseline", {"correction_mode": "end_inside"}
    ),
    Config("iterative end_inside 25", "jaxbeta", "iterative", dict(END_INSIDE)),
    # The stop rule alone, then acceleration alone, on the reference's loop.
    Config(
        "bi lagged picard rel",
        "jaxbeta",
        "iterative",
        {"stop_rule": "relative", "tol": JAXBETA_TOL, "max_outer_iters": 100},
    ),
    _jaxbeta_iterative("bi lagged anderson rel", solver="anderson"),
    # The consistent prefill update, with each solver.
    _jaxbeta_iterative("bi consistent picard rel", prefill_update="consistent"),
    _jaxbeta_iterative(
        "bi consistent newton rel", prefill_update="consistent", solver="newton"
    ),
    _jaxbeta_iterative(
        "ei consistent picard rel", **END_INSIDE, prefill_update="consistent"
    ),
    _jaxbeta_iterative(
        "ei consistent anderson rel",
        **END_INSIDE,
        prefill_update="consistent",
        solver="anderson",
    ),
    _jaxbeta_iterative(
        "ei consistent newton rel",
        **END_INSIDE,
        prefill_update="consistent",
        solver="newton",
    ),
    # jaxbeta.fit: its defaults, then one default changed at a time (with
    # row_weight="none" it runs the "ei consistent <solver> rel" line above).
    Config("fit (recommended)", "jaxbeta", "fit", {}),
    Config("fit, budget not given", "jaxbeta", "fit", {}, engine_budget=False),
    *(
        Config(
            f"fit row_weight={weighting}", "jaxbeta", "fit", {"row_weight": weighting}
        )
        for weighting in ROW_WEIGHTS
        if weighting not in ("none", RECOMMENDED["row_weight"])
    ),
    *(
        Config(f"fit solver={solver}", "jaxbeta", "fit", {"solver": solver})
        for solver in ("anderson", "newton")
        if solver != RECOMMENDED["solver"]
    ),
    # Not an estimator: least squares on the simulator's step log.
    Config("oracle: step log WLS", "oracle", "oracle", {}),
)


@dataclasses.dataclass
class Outcome:
    """What one configuration returned on one trace."""

    beta: np.ndarray  # [3]
    stop_code: int  # 0 converged (baselines: always)
    iterations: int
    seconds: float


def _fitter(config: Config) -> Callable:
    """A function (simulation, prepared trace) -> Outcome for the config."""
    if config.kind == "baseline":
        mode = config.options.get("correction_mode", "end")

        def run_baseline(simulation, prepared):
            chunk = np.float64(simulation.chunk_size)
            with jax.enable_x64(True):
                result = fit_baseline_arrays(
                    prepared.arrays, chunk, correction_mode=mode
                )
                beta = np.asarray(jax.device_get(result.beta), dtype=np.float64)
            return beta, 0, 0

        return run_baseline
    if config.kind == "iterative":
        options = dict(config.options)
        for key in ("tol", "damping_eta"):
            if key in options:
                options[key] = np.float64(options[key])

        def run_iterative(simulation, prepared):
            chunk = np.float64(simulation.chunk_size)
            with jax.enable_x64(True):
                result = jax.device_get(
                    fit_iterative_arrays(prepared.arrays, chunk, **options)
                )
            return (
                np.asarray(result.beta, dtype=np.float64),
                int(result.stop_code),
                int(result.n_outer_iters),
            )

        return run_iterative

    if config.kind == "oracle":
        return run_step_oracle

    budget = {}

    def run_fit(simulation, prepared):
        if config.engine_budget:
            budget["max_num_batched_tokens"] = simulation.params[
                "max_num_batched_tokens"
            ]
        result = fit(
            simulation.phases,
            chunk_size=simulation.chunk_size,
            **budget,
            **config.options,
        )
        code = {"converged": 0, "max_iters": 1, "cycle": 2, "non_finite": 3}
        return result.beta, code[result.stop_reason], result.n_outer_iters

    return run_fit


def run_step_oracle(simulation, prepared):
    """Weighted least squares of every step's duration on its token counts.

    Uses the simulator's step log, which no trace shows: the step-level
    information bound that no phase-based estimator can beat. Step noise is
    multiplicative, so each step is weighted by 1 / (noise-free step time)^2.
    """
    steps = simulation.steps
    design = np.stack(
        [
            np.ones(len(steps)),
            steps["prefill_tokens"].to_numpy(dtype=np.float64),
            steps["decode_tokens"].to_numpy(dtype=np.float64),
        ],
        axis=1,
    )
    duration = (steps["t_end"] - steps["t_start"]).to_numpy()
    scale = 1.0 / (design @ np.asarray(simulation.beta))
    column_norm = np.linalg.norm(design * scale[:, None], axis=0)
    column_norm[column_norm == 0] = 1.0
    solution, *_ = np.linalg.lstsq(
        design * scale[:, None] / column_norm, duration * scale, rcond=None
    )
    return solution / column_norm, 0, 0


def _timed(run, simulation, prepared) -> Outcome:
    start = time.perf_counter()
    beta, code, iterations = run(simulation, prepared)
    return Outcome(beta, code, iterations, time.perf_counter() - start)


# ----------------------------------------------------------------------------
# statistics and tables


def _subsets(cells, facts) -> dict[str, np.ndarray]:
    """Boolean masks over the cells, by name."""
    holds = np.array([f["assumptions_hold"] for f in facts])
    hard = np.array([grid.hard_regime(c) for c in cells])
    noisy = np.array([c.noise > 0 for c in cells])
    bound = np.array([f["budget_bound"] for f in facts])
    return {
        "all traces": np.ones(len(cells), dtype=bool),
        "SPEC assumptions hold, outside long/light": holds & ~hard,
        "SPEC assumptions hold, long/light": holds & hard,
        "noise 5% (budget binding or not)": noisy,
        "no noise, budget binding": ~noisy & bound,
    }


def _select(items, mask) -> list:
    return [item for item, keep in zip(items, mask, strict=True) if keep]


def _errors(outcomes: list[Outcome], cells) -> np.ndarray:
    if not outcomes:
        return np.zeros((0, 3))
    truth = np.array([c.beta for c in cells])
    estimate = np.array([o.beta for o in outcomes])
    return np.abs(estimate - truth) / truth  # [n, 3]


def _pct(value: float, digits: int | None = None) -> str:
    """A relative error as a percentage with sensible (or ``digits``
    significant) digits."""
    if not np.isfinite(value):
        return "nan"
    percent = 100 * value
    if digits is not None:
        return f"{percent:.{digits}g}%"
    if percent == 0:
        return "0"
    if percent >= 10:
        return f"{percent:.0f}%"
    if percent >= 0.1:
        return f"{percent:.2f}%"
    return f"{percent:.1e}%"


def _table(results, cells, mask, configs) -> list[str]:
    header = (
        "| configuration | family | "
        + " | ".join(f"{b} med / p90 / max" for b in BETA_NAMES)
        + " | converged | iterations med / max |"
    )
    lines = [header, "|" + "---|" * 6]
    for config in configs:
        outcomes = _select(results[config.name], mask)
        chosen = _select(cells, mask)
        if not outcomes:
            continue
        errors = _errors(outcomes, chosen)
        cols = []
        for j in range(3):
            e = errors[:, j]
            cols.append(
                f"{_pct(np.median(e))} / {_pct(np.quantile(e, 0.9))} / "
                f"{_pct(np.max(e))}"
            )
        converged = np.mean([o.stop_code == 0 for o in outcomes])
        iterations = np.array([o.iterations for o in outcomes])
        iteration_text = (
            "-"
            if config.kind in ("baseline", "oracle")
            else f"{np.median(iterations):.0f} / {iterations.max()}"
        )
        family = {"reference-compatible": "ref"}.get(config.family, config.family)
        lines.append(
            f"| {config.name} | {family} | "
            + " | ".join(cols)
            + f" | {100 * converged:.1f}% | {iteration_text} |"
        )
    return lines


def _regime_table(results, cells, names) -> list[str]:
    """Median / max over coefficients-and-traces of the relative error per
    (load, workload), for a few configurations; noise-free traces only."""
    lines = [
        "| load | workload | " + " | ".join(f"{n}: med / max" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for load in grid.LOADS:
        for workload in grid.WORKLOADS:
            mask = np.array(
                [
                    c.load == load and c.workload == workload and c.noise == 0
                    for c in cells
                ]
            )
            chosen = _select(cells, mask)
            cols = []
            for name in names:
                outcomes = _select(results[name], mask)
                errors = _errors(outcomes, chosen)
                cols.append(f"{_pct(np.median(errors))} / {_pct(np.max(errors))}")
            lines.append(f"| {load} | {workload} | " + " | ".join(cols) + " |")
    return lines


def _acceptance(results, cells, subsets) -> list[str]:
    """The issue's acceptance criteria, checked on the grid."""
    outcomes = results["fit (recommended)"]
    errors = _errors(outcomes, cells)
    lines = []
    converged = np.array([o.stop_code == 0 for o in outcomes])
    lines.append(
        f"- `fit` converges on every trace: **{'yes' if converged.all() else 'NO'}** "
        f"({converged.sum()} of {len(cells)})."
    )
    medians = np.median(errors, axis=0)
    ok = bool(np.all(medians <= 2e-3))
    listed = ", ".join(
        f"{b} {_pct(m, 3)}" for b, m in zip(BETA_NAMES, medians, strict=True)
    )
    lines.append(
        f"- median relative error <= 0.2% per beta: **{'yes' if ok else 'NO'}** "
        f"({listed})."
    )
    unbudgeted = np.median(_errors(results["fit, budget not given"], cells), axis=0)
    lines.append(
        "  These `fit` figures pass the engine's token budget B "
        "(`max_num_batched_tokens`) on the cells that have one; without it "
        "(`fit, budget not given`) the medians are "
        + ", ".join(
            f"{b} {_pct(m, 3)}" for b, m in zip(BETA_NAMES, unbudgeted, strict=True)
        )
        + "."
    )
    noisy = subsets["noise 5% (budget binding or not)"]
    oracle = _errors(
        _select(results["oracle: step log WLS"], noisy), _select(cells, noisy)
    )
    lines.append(
        f"  The noise floor: on the {noisy.sum()} noisy traces `fit` has medians "
        + ", ".join(
            f"{b} {_pct(m, 3)}"
            for b, m in zip(BETA_NAMES, np.median(errors[noisy], axis=0), strict=True)
        )
        + "; least squares on the simulator's step log (the oracle) has "
        + ", ".join(
            f"{b} {_pct(m, 3)}"
            for b, m in zip(BETA_NAMES, np.median(oracle, axis=0), strict=True)
        )
        + f". {np.sum(errors[:, 2] <= 2e-3)} of {len(cells)} traces have beta2 "
        "within 0.2%."
    )
    mask = subsets["SPEC assumptions hold, outside long/light"]
    worst = errors[mask].max() if mask.any() else np.nan
    ok = bool(worst <= 1e-2)
    lines.append(
        f"- within 1% on every trace where the SPEC's assumptions hold, outside "
        f"long/light ({mask.sum()} traces): **{'yes' if ok else 'NO'}** "
        f"(worst {_pct(worst)})."
    )
    mask = subsets["SPEC assumptions hold, long/light"]
    if not mask.any():
        return lines
    ours = errors[mask]
    theirs = _errors(
        _select(results["ref iterative 25"], mask),
        _select(cells, mask),
    )
    better = ours.max(axis=1) <= theirs.max(axis=1)
    lines.append(
        f"- long/light with the SPEC's assumptions ({mask.sum()} traces): worst "
        f"relative error {_pct(ours.max())} (reference iterative: "
        f"{_pct(theirs.max())}); `fit`'s worst coefficient is at least as "
        f"good as the reference's on {better.sum()} of {mask.sum()} traces."
    )
    return lines


def write_markdown(path, results, cells, facts, timing, argv) -> None:
    subsets = _subsets(cells, facts)
    out = [
        "# Accuracy benchmark",
        "",
        "Relative error |estimate - truth| / truth of each beta on simulated "
        "traces with known betas, for the reference-compatible configurations "
        "(`ref`, the defaults of `estimate_betas_baseline` / "
        "`estimate_betas_iterative` and the reference's other modes) and "
        "jaxbeta's options (`jaxbeta`), all on the same traces. The `oracle` "
        "line is not an estimator: it fits the simulator's step log, which no "
        "trace shows, and marks the accuracy that the step noise allows. "
        "Generated by `benchmarks/bench_accuracy.py`; do not edit by hand.",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/bench_accuracy.py', *argv])}` "
        f"({timing['total']:.0f} s wall on {timing['machine']}; "
        f"simulation {timing['simulate']:.0f} s, compilation "
        f"{timing['compile']:.0f} s, fits {timing['fits']:.0f} s).",
        "",
        "## Acceptance (issue 6)",
        "",
        *_acceptance(results, cells, subsets),
        "",
    ]
    for title, mask in subsets.items():
        out += [
            f"## {title} ({mask.sum()} traces)",
            "",
            *_table(results, cells, mask, CONFIGS),
            "",
        ]
    names = [
        "ref iterative 25",
        "ref iterative 200",
        "fit (recommended)",
        "fit, budget not given",
    ]
    out += [
        "## By regime (noise-free traces, budget binding or not)",
        "",
        "Median / max relative error over the three betas of all noise-free "
        "traces of the regime (36 traces each).",
        "",
        *_regime_table(results, cells, names),
        "",
        "## Configurations",
        "",
        "`bi` = `prefill_correction_mode='beta_informed'`, `ei` = "
        "`'end_inside'` (with `init_via_baseline_correction='end_inside'`); "
        "`rel` = `stop_rule='relative'`, "
        f"`tol={JAXBETA_TOL:g}`, `max_outer_iters=200`. A fit counts as "
        "converged when its stop reason is `converged` (baselines always "
        "are); iterations are MM map evaluations. `B` is the token budget "
        "the trace was simulated with (`max_num_batched_tokens`, 2C on the "
        "budget cells, None on the others): like C it is part of the "
        "engine's configuration, which a user calibrating that engine has; "
        "`fit, budget not given` shows `fit` without it.",
        "",
        "| configuration | call |",
        "|---|---|",
        *[f"| {c.name} | {c.describe()} |" for c in CONFIGS if c.kind != "oracle"],
        "| oracle: step log WLS | least squares of every step's duration on "
        "(1, prefill tokens, decode tokens) from `SimulationResult.steps`, "
        "weighted by 1 / (noise-free step time)^2 |",
        "",
        "`fit` defaults: "
        + ", ".join(f"`{k}={v!r}`" for k, v in RECOMMENDED.items())
        + ".",
        "",
        "Mean seconds per fit (after compilation): "
        + ", ".join(
            f"{name} {1000 * seconds:.0f} ms"
            for name, seconds in timing["per_fit"].items()
        )
        + ".",
        "",
        "## Grid",
        "",
        *[line.rstrip() for line in grid.__doc__.strip().splitlines()],
        "",
        f"Of the {len(cells)} traces, {sum(f['budget_bound'] for f in facts)} "
        "hit their token budget in some step, and "
        f"{sum(f['assumptions_hold'] for f in facts)} satisfy the SPEC's "
        "assumptions (no noise, no binding budget).",
        "",
    ]
    Path(path).write_text("\n".join(out))


def write_raw(path, results, cells, facts) -> None:
    """One CSV row per (configuration, trace): cell, truth, estimate, stop."""
    import pandas as pd

    rows = []
    for name, outcomes in results.items():
        for cell, fact, outcome in zip(cells, facts, outcomes, strict=True):
            rows.append(
                {
                    "config": name,
                    **dataclasses.asdict(cell),
                    **fact,
                    **dict(
                        zip([f"true_{b}" for b in BETA_NAMES], cell.beta, strict=True)
                    ),
                    **dict(zip(BETA_NAMES, outcome.beta, strict=True)),
                    "stop_code": outcome.stop_code,
                    "iterations": outcome.iterations,
                    "seconds": outcome.seconds,
                }
            )
    pd.DataFrame(rows).to_csv(path, index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="cells to fit")
    parser.add_argument("--out", type=Path, default=None, help="Markdown output")
    parser.add_argument(
        "--raw-out", type=Path, default=None, help="optional CSV of every fit"
    )
    args = parser.parse_args(argv)
    argv_used = [] if argv is None else list(argv)
    if argv is None:
        argv_used = sys.argv[1:]
    started = time.perf_counter()
    cells = grid.cells()
    if args.limit:
        cells = cells[:: max(1, len(cells) // args.limit)][: args.limit]
    out = args.out if args.out is not None else (None if args.limit else DEFAULT_OUT)

    results: dict[str, list[Outcome]] = {c.name: [] for c in CONFIGS}
    facts = []
    runners = {c.name: _fitter(c) for c in CONFIGS}
    seconds_simulating = 0.0
    seconds_fitting = {c.name: 0.0 for c in CONFIGS}

    # Compile every configuration once, two at a time (XLA compiles outside
    # the GIL), on the first trace and on the first with a token budget (fit
    # given a budget is another program); all traces share one padded shape.
    tick = time.perf_counter()
    warmup = [cells[0]] + [c for c in cells if c.budget != "none"][:1]
    for cell in warmup:
        simulation = grid.simulate_cell(cell)
        prepared = prepare_trace(simulation.phases, n_pad=grid.N_PAD)
        with ThreadPoolExecutor(max_workers=COMPILE_THREADS) as pool:
            list(
                pool.map(
                    lambda run, sim=simulation, trace=prepared: run(sim, trace),
                    runners.values(),
                )
            )
    seconds_compiling = time.perf_counter() - tick

    for index, cell in enumerate(cells):
        tick = time.perf_counter()
        simulation = grid.simulate_cell(cell)
        prepared = prepare_trace(simulation.phases, n_pad=grid.N_PAD)
        facts.append(
            {
                "budget_bound": grid.budget_bound(cell, simulation),
                "assumptions_hold": grid.spec_assumptions_hold(cell, simulation),
            }
        )
        seconds_simulating += time.perf_counter() - tick
        for config in CONFIGS:
            outcome = _timed(runners[config.name], simulation, prepared)
            seconds_fitting[config.name] += outcome.seconds
            results[config.name].append(outcome)
        if (index + 1) % 50 == 0 or index + 1 == len(cells):
            elapsed = time.perf_counter() - started
            print(f"{index + 1}/{len(cells)} traces, {elapsed:.0f} s", flush=True)

    subsets = _subsets(cells, facts)
    for title, mask in subsets.items():
        print(f"\n{title} ({mask.sum()} traces)")
        for line in _table(results, cells, mask, CONFIGS):
            print(line)
    print()
    for line in _acceptance(results, cells, subsets):
        print(line)
    total = time.perf_counter() - started
    timing = {
        "total": total,
        "simulate": seconds_simulating,
        "compile": seconds_compiling,
        "fits": sum(seconds_fitting.values()),
        "per_fit": {k: v / len(cells) for k, v in seconds_fitting.items()},
        "machine": f"{platform.machine()}, {jax.device_count()} JAX CPU device, "
        f"jax {jax.__version__}",
    }
    print(
        f"\ntotal {total:.0f} s: simulate {seconds_simulating:.0f} s, compile "
        f"{seconds_compiling:.0f} s, fits {timing['fits']:.0f} s"
    )
    for name, seconds in seconds_fitting.items():
        print(f"  {name}: {1000 * seconds / len(cells):.0f} ms per fit")
    if out is not None:
        write_markdown(out, results, cells, facts, timing, argv_used)
        print(f"wrote {out}")
    if args.raw_out is not None:
        write_raw(args.raw_out, results, cells, facts)
        print(f"wrote {args.raw_out}")


if __name__ == "__main__":
    main()
