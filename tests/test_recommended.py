"""jaxbeta.fit and the fixed-point options of the iterative estimator.

The traces are small (60 requests, at most 128 phase rows, one padded shape)
so that every configuration compiles once; the defaults' parity with the
reference is checked by tests/test_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxbeta
from jaxbeta._api import coefficient_std_errors, identifiability_warnings
from jaxbeta._boundary import prepare_trace
from jaxbeta._fixed_point import ZERO_SCALE, fit_fixed_point_arrays, stop_measure
from jaxbeta._iterative import budget_bound_rows, fit_iterative_arrays
from jaxbeta._recommended import RECOMMENDED, phase_weights

N_PAD = 128
RECOVERY_RTOL = 1e-8
"""fit recovers the true betas of noise-free, budget-free traces to this."""

PARITY = Path(__file__).parent / "fixtures" / "parity"

# (seed, chunk size, true beta, arrival rate): traces on which the reference's
# defaults end in a period-2 cycle (checked below).
CYCLING = [
    (1, 2048, (8e-3, 6e-5, 3e-4), 1.0),
    (8, 512, (8e-3, 6e-5, 3e-4), 2.0),
    (10, 2048, (5e-3, 2e-5, 1e-4), 4.0),
]
FAST_ENGINE = (0, 2048, (2e-3, 5e-6, 3e-5), 4.0)


def _simulate(seed, chunk, beta, rate, **kwargs):
    return jaxbeta.simulate(
        60,
        beta=beta,
        chunk_size=chunk,
        arrival_rate=rate,
        prompt_dist=("lognormal", 600, 1.0, 16, 8000),
        output_dist=("lognormal", 60, 0.8, 1, 400),
        seed=seed,
        **kwargs,
    )


def _relative_error(estimate, truth):
    return np.abs(np.asarray(estimate) - np.asarray(truth)) / np.asarray(truth)


@pytest.mark.parametrize("case", CYCLING, ids=lambda c: f"seed{c[0]}-C{c[1]}")
def test_fit_converges_where_plain_iteration_cycles(case):
    simulation = _simulate(*case)
    chunk = case[1]
    reference = jaxbeta.estimate_betas_iterative(simulation.phases, chunk_size=chunk)
    assert reference.stop_reason == "cycle"

    result = jaxbeta.fit(simulation.phases, chunk_size=chunk, n_pad=N_PAD)
    assert isinstance(result, jaxbeta.IterativeResult)
    assert result.stop_reason == "converged" and result.converged
    assert result.diagnostics["stop_reason"] == "converged"
    assert result.algo == "recommended"
    assert result.settings["algo"] == "recommended"
    assert result.settings["solver"] == RECOMMENDED["solver"]
    np.testing.assert_allclose(result.beta, simulation.beta, rtol=RECOVERY_RTOL)
    assert _relative_error(reference.beta, simulation.beta).max() > 1e-3
    history = result.history
    assert len(history["beta"]) == result.n_outer_iters + 1
    assert history["stop_measure"][-1] < RECOMMENDED["tol"]
    assert isinstance(result.diagnostics["warnings"], list)
    assert "cond_scaled" in result.diagnostics


def _parity_arrays(case: str):
    expected = json.loads((PARITY / "expected.json").read_text())["cases"][case]
    table = pd.read_csv(PARITY / "traces" / Path(expected["csv"]).name)
    prepared = prepare_trace(table, n_pad=N_PAD)
    return prepared.arrays, float(expected["chunk_size"])


@pytest.mark.parametrize("case", ["random_c64_n60", "sim_c64_n100", "toy4_example"])
def test_general_loop_reproduces_the_reference_loop(case):
    """The solver-options loop, run with the reference's choices, takes the
    same iterations to the same betas as the default loop (here on a 2-cycle
    and on converging runs), so the options only add behaviour."""
    arrays, chunk = _parity_arrays(case)
    general = jax.jit(
        fit_fixed_point_arrays,
        static_argnames=(
            "prefill_correction_mode",
            "max_outer_iters",
            "init_via_baseline_correction",
            "solver",
            "stop_rule",
            "prefill_update",
            "anderson_memory",
            "inner_iters",
        ),
    )
    with jaxbeta.float64():
        default = fit_iterative_arrays(arrays, chunk)
        looped = general(
            arrays, chunk, 0.0, "beta_informed", 25, 1e-6, 1.0, "end", None,
            solver="picard", stop_rule="absolute", prefill_update="lagged",
            anderson_memory=3, inner_iters=4,
        )  # fmt: skip
    assert int(looped.n_outer_iters) == int(default.n_outer_iters)
    assert int(looped.stop_code) == int(default.stop_code)
    m = int(default.n_outer_iters)
    np.testing.assert_allclose(
        looped.history_beta[: m + 1], default.history_beta[: m + 1], rtol=1e-12,
        atol=1e-18,
    )  # fmt: skip
    np.testing.assert_allclose(looped.beta, default.beta, rtol=1e-12, atol=1e-18)


def test_relative_stop_measure():
    with jaxbeta.float64():
        scale = jnp.array([1e-2, 1e-4, 1e-3])
        old = jnp.array([5e-3, 0.0, 2e-4])

        def relative(new):
            return float(stop_measure(new, old, "relative", scale))

        # A coefficient at 0 in both iterates contributes nothing.
        new = old.at[0].multiply(1 + 1e-10)
        assert relative(new) == pytest.approx(1e-10, rel=1e-3)
        # One flickering at rounding level is measured against ZERO_SCALE * s_j.
        flicker = new.at[1].set(1e-30)
        assert relative(flicker) == pytest.approx(1e-10, rel=1e-3)
        assert relative(old.at[1].set(1e-30)) == pytest.approx(
            1e-30 / (ZERO_SCALE * 1e-4)
        )
        # Each coefficient relative to its own size: beta2 moving 1% reads ~0.01.
        new = old.at[2].multiply(1.01)
        assert relative(new) == pytest.approx(0.01 / 1.01, rel=1e-9)
        # The absolute rule is the reference's L2 norm, in seconds.
        assert float(stop_measure(new, old, "absolute", scale)) == pytest.approx(
            2e-6, rel=1e-9
        )


def test_absolute_rule_stops_early_on_a_fast_engine():
    """beta1 of a few microseconds moves less than the absolute tol of 1e-6 s
    while still percents off; the relative rule holds it to its own size."""
    simulation = _simulate(*FAST_ENGINE)
    chunk = FAST_ENGINE[1]
    options = dict(
        prefill_correction_mode="end_inside",
        init_via_baseline_correction="end_inside",
        prefill_update="consistent",
        max_outer_iters=100,
    )
    absolute = jaxbeta.estimate_betas_iterative(
        simulation.phases, chunk_size=chunk, stop_rule="absolute", tol=1e-6, **options
    )
    relative = jaxbeta.estimate_betas_iterative(
        simulation.phases, chunk_size=chunk, stop_rule="relative", tol=1e-9, **options
    )
    assert absolute.stop_reason == relative.stop_reason == "converged"
    assert _relative_error(absolute.beta1, simulation.beta[1]) > 1e-2
    assert relative.n_outer_iters > absolute.n_outer_iters
    np.testing.assert_allclose(relative.beta, simulation.beta, rtol=RECOVERY_RTOL)
    assert relative.history["stop_measure"][-1] < 1e-9
    assert relative.settings["stop_rule"] == "relative"


def _batch(simulations):
    prepared = [prepare_trace(s.phases, n_pad=N_PAD) for s in simulations]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *[p.arrays for p in prepared])


def test_recommended_options_vmap_to_the_fit_of_each_trace():
    simulations = [_simulate(*case) for case in CYCLING[:2]]
    chunks = np.array([case[1] for case in CYCLING[:2]], dtype=np.float64)
    batch = _batch(simulations)
    options = {
        k: v
        for k, v in RECOMMENDED.items()
        if k not in ("row_weight", "tol", "damping_eta", "accelerate_below")
    }

    def one(arrays, chunk):
        weight = phase_weights(arrays, chunk, 0.0, RECOMMENDED["row_weight"])
        return fit_iterative_arrays(
            arrays, chunk, 0.0, weight=weight, tol=RECOMMENDED["tol"],
            damping_eta=RECOMMENDED["damping_eta"],
            accelerate_below=RECOMMENDED["accelerate_below"], **options,
        )  # fmt: skip

    with jaxbeta.float64():
        batched = jax.jit(jax.vmap(one))(batch, chunks)
    for lane, (simulation, case) in enumerate(zip(simulations, CYCLING, strict=False)):
        alone = jaxbeta.fit(simulation.phases, chunk_size=case[1], n_pad=N_PAD)
        assert int(batched.n_outer_iters[lane]) == alone.n_outer_iters
        np.testing.assert_allclose(batched.beta[lane], alone.beta, rtol=1e-12)


def test_newton_jits_and_vmaps():
    simulations = [_simulate(*case) for case in CYCLING[1:]]
    chunks = np.array([case[1] for case in CYCLING[1:]], dtype=np.float64)
    batch = _batch(simulations)
    options = dict(
        prefill_correction_mode="end_inside",
        init_via_baseline_correction="end_inside",
        prefill_update="consistent",
        solver="newton",
        stop_rule="relative",
        tol=1e-9,
        max_outer_iters=100,
    )
    with jaxbeta.float64():

        def one(arrays, chunk):
            return fit_iterative_arrays(arrays, chunk, **options)

        batched = jax.jit(jax.vmap(one))(batch, chunks)
        for lane, simulation in enumerate(simulations):
            arrays = jax.tree.map(lambda leaf, i=lane: leaf[i], batch)
            alone = fit_iterative_arrays(arrays, chunks[lane], **options)
            assert int(alone.stop_code) == 0
            assert int(batched.n_outer_iters[lane]) == int(alone.n_outer_iters)
            np.testing.assert_allclose(batched.beta[lane], alone.beta, rtol=1e-12)
            np.testing.assert_allclose(alone.beta, simulation.beta, rtol=RECOVERY_RTOL)


def test_fit_warns_about_a_coefficient_it_cannot_see():
    # Single-token outputs: no decode rows, so beta2 multiplies a zero column.
    simulation = jaxbeta.simulate(
        40, chunk_size=256, output_dist=("fixed", 1), arrival_rate=2.0, seed=3
    )
    result = jaxbeta.fit(simulation.phases, chunk_size=256, n_pad=N_PAD)
    assert result.beta2 == 0.0
    notes = result.diagnostics["warnings"]
    assert any("beta2" in note and "zero" in note for note in notes)


def test_fit_warns_about_a_rank_deficient_design():
    table = pd.read_csv(PARITY / "traces" / "sequential_prompt_multiple_of_C.csv")
    expected = json.loads((PARITY / "expected.json").read_text())
    chunk = expected["cases"]["sequential_prompt_multiple_of_C"]["chunk_size"]
    result = jaxbeta.fit(table, chunk_size=chunk, n_pad=N_PAD)
    notes = " ".join(result.diagnostics["warnings"])
    assert "rank-deficient" in notes


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"solver": "broyden"}, "solver"),
        ({"stop_rule": "loose"}, "stop_rule"),
        ({"prefill_update": "eager"}, "prefill_update"),
        ({"anderson_memory": 0}, "anderson_memory"),
        ({"row_weight": "by_tokens"}, "row_weight"),
        ({"tolerance": 1e-9}, "unknown option"),
        ({"accelerate_below": 0.0}, "accelerate_below"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": -512}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": "lots"}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": True}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": float("inf")}, "max_num_batched_tokens"),
    ],
)
def test_fit_rejects_bad_options(options, needle):
    table = jaxbeta.simulate(5, seed=0).phases
    with pytest.raises(ValueError, match=needle):
        jaxbeta.fit(table, chunk_size=512, **options)


def test_iterative_rejects_bad_solver_options():
    table = jaxbeta.simulate(5, seed=0).phases
    with pytest.raises(ValueError, match="solver"):
        jaxbeta.estimate_betas_iterative(table, chunk_size=512, solver="secant")
    with pytest.raises(ValueError, match="inner_iters"):
        jaxbeta.estimate_betas_iterative(table, chunk_size=512, inner_iters=0)
    # The fixed-point solvers fit squared loss only: say so rather than
    # silently dropping the Huber loss.
    with pytest.raises(ValueError, match="huber"):
        jaxbeta.estimate_betas_iterative(
            table, chunk_size=512, loss="huber", solver="anderson"
        )
    with pytest.raises(ValueError, match="loss"):
        jaxbeta.fit(table, chunk_size=512, loss="huber")


def test_std_errors_are_the_least_squares_ones():
    rng = np.random.default_rng(0)
    design = rng.uniform(1.0, 10.0, size=(50, 3))
    beta = np.array([2e-3, 5e-5, 3e-4])
    target = design @ beta + 1e-4 * rng.standard_normal(50)
    estimate = np.linalg.lstsq(design, target, rcond=None)[0]
    residual = target - design @ estimate
    covariance = residual @ residual / (50 - 3) * np.linalg.inv(design.T @ design)
    np.testing.assert_allclose(
        coefficient_std_errors(design, target, estimate),
        np.sqrt(np.diag(covariance)),
        rtol=1e-8,
    )
    # A coefficient held at 0 is not estimated: NaN, and the others use the
    # remaining columns only.
    held = estimate.copy()
    held[2] = 0.0
    errors = coefficient_std_errors(design, target, held)
    assert np.isnan(errors[2]) and np.all(np.isfinite(errors[:2]))


def test_warnings_name_poorly_determined_and_bound_coefficients():
    design = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [3.0, 5.0, 0.0]])
    beta = np.array([1e-3, 2e-5, 0.0])
    notes = identifiability_warnings(
        beta, np.inf, design, std_error=np.array([1e-6, 5e-6, np.nan])
    )
    assert any("beta1 is poorly determined" in note for note in notes)
    assert not any("beta0" in note for note in notes)
    assert any("beta2 multiplies an all-zero" in note for note in notes)
    # The two other columns are independent: no rank warning for them.
    assert not any("rank-deficient" in note for note in notes)


def test_fit_in_float32_stops_at_a_reachable_tolerance():
    simulation = _simulate(*CYCLING[1])
    result = jaxbeta.fit(
        simulation.phases, chunk_size=CYCLING[1][1], n_pad=N_PAD, dtype="float32"
    )
    assert result.stop_reason == "converged"
    assert result.settings["tol"] == 1e-5
    np.testing.assert_allclose(result.beta, simulation.beta, rtol=1e-3)


# ---------------------------------------------------------------------------
# a per-step token budget (max_num_batched_tokens)

BUDGET_ENGINE = (5e-3, 2e-5, 1e-4)


def _budget_trace(seed, rate=20.0, chunk=512, budget=1024):
    return _simulate(seed, chunk, BUDGET_ENGINE, rate, max_num_batched_tokens=budget)


def _budget_bound_rows_by_loop(phases: pd.DataFrame, chunk, budget) -> np.ndarray:
    """The rows fit(max_num_batched_tokens=budget) sets aside, from the
    definition: prefill rows whose window holds a segment of positive length
    on which C * n_pf > B - n_dec. Plain NumPy, one segment at a time."""
    start = phases["t_start"].to_numpy(float)
    end = phases["t_end"].to_numpy(float)
    prefill = phases["phase_type"].str.lower().to_numpy() == "prefill"
    points = np.unique(np.concatenate([start, end]))
    binding_segments = []
    for left, right in zip(points[:-1], points[1:], strict=True):
        active = (start <= left) & (end > left)
        n_prefill = np.sum(active & prefill)
        n_decode = np.sum(active & ~prefill)
        if chunk * n_prefill > budget - n_decode:
            binding_segments.append((left, right))
    bound = np.zeros(len(phases), dtype=bool)
    for i in np.flatnonzero(prefill):
        bound[i] = any(
            start[i] <= left and right <= end[i] for left, right in binding_segments
        )
    return bound


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_sets_aside_the_prefill_rows_it_may_have_slowed(seed):
    simulation = _budget_trace(seed)
    phases = simulation.phases
    expected = _budget_bound_rows_by_loop(phases, 512, 1024)
    assert 0 < expected.sum() < np.sum(phases["phase_type"] == "prefill")
    prepared = prepare_trace(phases, n_pad=N_PAD)
    with jax.enable_x64(True):
        bound = budget_bound_rows(prepared.arrays, np.float64(512), np.float64(1024))
    np.testing.assert_array_equal(np.asarray(bound)[: len(phases)], expected)
    assert not np.any(np.asarray(bound)[len(phases) :])  # padding
    for estimator in (jaxbeta.fit, jaxbeta.estimate_betas_iterative):
        result = estimator(phases, chunk_size=512, max_num_batched_tokens=1024)
        assert result.diagnostics["n_budget_bound_prefill"] == expected.sum()
        assert result.settings["max_num_batched_tokens"] == 1024


def test_the_iterative_estimator_takes_the_budget_as_fit_does():
    # fit = estimate_betas_iterative with RECOMMENDED's options and row
    # weights; with row_weight="none" the two are the same computation.
    simulation = _budget_trace(2)
    options = {k: v for k, v in RECOMMENDED.items() if k != "row_weight"}
    kwargs = dict(chunk_size=512, n_pad=N_PAD, max_num_batched_tokens=1024)
    by_fit = jaxbeta.fit(simulation.phases, row_weight="none", **kwargs)
    del kwargs["n_pad"]
    by_iterative = jaxbeta.estimate_betas_iterative(
        simulation.phases, **options, **kwargs
    )
    np.testing.assert_allclose(by_iterative.beta, by_fit.beta, rtol=1e-12)
    assert by_iterative.n_outer_iters == by_fit.n_outer_iters
    plain = jaxbeta.estimate_betas_iterative(simulation.phases, chunk_size=512)
    assert plain.diagnostics["n_budget_bound_prefill"] == 0
    assert plain.settings["max_num_batched_tokens"] is None


def test_a_budget_that_never_binds_changes_nothing():
    simulation = _simulate(*CYCLING[1])
    phases, chunk = simulation.phases, CYCLING[1][1]
    plain = jaxbeta.fit(phases, chunk_size=chunk, n_pad=N_PAD)
    roomy = jaxbeta.fit(
        phases, chunk_size=chunk, n_pad=N_PAD, max_num_batched_tokens=10**9
    )
    assert roomy.diagnostics["n_budget_bound_prefill"] == 0
    np.testing.assert_array_equal(roomy.beta, plain.beta)
    assert roomy.n_outer_iters == plain.n_outer_iters


@pytest.mark.parametrize("seed", range(4))
def test_knowing_the_budget_beats_ignoring_it_where_it_binds(seed):
    # Heavy load (20 requests/s on this engine), B = 2C: the budget cuts
    # prefill chunks in many steps; no noise, so the error is the model's.
    simulation = _budget_trace(seed)
    phases = simulation.phases
    ignored = jaxbeta.fit(phases, chunk_size=512, n_pad=N_PAD)
    known = jaxbeta.fit(
        phases, chunk_size=512, n_pad=N_PAD, max_num_batched_tokens=1024
    )
    assert known.stop_reason == "converged"
    worst_known = _relative_error(known.beta, simulation.beta).max()
    worst_ignored = _relative_error(ignored.beta, simulation.beta).max()
    assert worst_known < worst_ignored
    assert worst_known < 0.02
