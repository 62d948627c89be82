"""Derivatives of the fits, bootstrap intervals and the Huber loss.

Every derivative is checked against central finite differences of the fit
itself, computed for all perturbations of one trace in a single vmapped call.
All traces are padded to 64 rows and every iterative fit uses the same static
settings, so each kernel compiles once for the whole module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxbeta
from jaxbeta._baseline import fit_baseline_arrays
from jaxbeta._boundary import prepare_trace
from jaxbeta._implicit import (
    FitInputs,
    MMState,
    _beta_stage,
    _prefill_stage,
    _Settings,
    _split_context,
    _typed,
    _with_inputs,
    baseline_beta,
    baseline_sensitivity_arrays,
    fit_inputs,
    iterative_beta,
    iterative_sensitivity_arrays,
    mm_map,
)
from jaxbeta._iterative import fit_iterative_arrays, mm_context
from jaxbeta._sensitivity import (
    bootstrap,
    boundary_sensitivity,
    derivative_column,
    sensitivity,
    top_influences,
)

CHUNK = 64.0
ITERS = 200  # one static iteration cap for every iterative fit here
# Finite differences run a fixed number of MM steps (tol 0), so each one is a
# smooth function of its inputs; 60 steps reach the fixed point to rounding
# on these traces (checked against the converged fit in every call).
FD_ITERS = 60
# Step of the timestamp differences, as a fraction of the smallest gap
# between distinct timestamps: gap / 20 already crosses kinks of the
# beta-informed correction on some traces.
FD_GAP_FRACTION = 1 / 200
TIGHT = dict(max_outer_iters=ITERS, tol=1e-13)
ADJOINT = dict(adjoint_tol=1e-11, adjoint_max_iters=300)
N_PAD = 64
FD_REL_TOL = 1e-5


def _x64(function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return function(*args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------
# traces


def random_trace(n_requests: int, seed: int) -> pd.DataFrame:
    """Continuous random timestamps (no ties), durations loosely following a
    step-time model, prompts that are never multiples of the chunk size."""
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0.0, 3.0, n_requests))
    prompt = rng.integers(1, 4 * int(CHUNK), n_requests)
    prompt = np.where(prompt % int(CHUNK) == 0, prompt + 1, prompt)
    decode = rng.integers(2, 60, n_requests)
    prefill_time = np.ceil(prompt / CHUNK) * 0.03 * rng.uniform(0.7, 1.5, n_requests)
    decode_start = arrival + prefill_time + rng.uniform(1e-3, 2e-2, n_requests)
    decode_time = decode * 0.02 * rng.uniform(0.7, 1.5, n_requests)
    rows = []
    for r in range(n_requests):
        rid = f"q{r:03d}"
        rows.append(
            (rid, "prefill", arrival[r], arrival[r] + prefill_time[r], prompt[r], 0)
        )
        rows.append(
            (
                rid,
                "decode",
                decode_start[r],
                decode_start[r] + decode_time[r],
                0,
                decode[r],
            )
        )  # noqa: E501
    return pd.DataFrame(
        rows,
        columns=[
            "request_id",
            "phase_type",
            "t_start",
            "t_end",
            "prefill_tokens",
            "decode_tokens",
        ],
    )


def simulated_trace(
    n_requests: int, seed: int, jitter: float = 0.0, **options
) -> pd.DataFrame:
    """A small simulated engine trace; ``jitter`` > 0 moves every boundary by
    up to that many seconds, which breaks the step-aligned ties."""
    phases = jaxbeta.simulate(
        n_requests,
        seed=seed,
        chunk_size=int(CHUNK),
        noise_sigma=0.1,
        output_dist=("lognormal", 12, 0.6, 2, 40),
        arrival_rate=8.0,
        **options,
    ).phases
    if jitter > 0:
        rng = np.random.default_rng(seed + 100)
        phases = phases.copy()
        phases["t_start"] += rng.uniform(-jitter, jitter, len(phases))
        phases["t_end"] += rng.uniform(-jitter, jitter, len(phases))
    return phases


def stretched_trace() -> pd.DataFrame:
    """A simulated trace with phase 3 stretched to 5x its duration, so that
    its residual exceeds ``HUBER_SCALE`` and the Huber loss is active."""
    phases = simulated_trace(26, 3, jitter=2e-4)
    duration = phases.loc[3, "t_end"] - phases.loc[3, "t_start"]
    phases.loc[3, "t_end"] = phases.loc[3, "t_start"] + 5 * duration
    return phases


def toy_trace() -> pd.DataFrame:
    """SPEC section 9: baseline (end) has beta2 = 0, iterative has beta0 = 0."""
    return pd.DataFrame(
        {
            "request_id": ["A", "A", "B", "B"],
            "phase_type": ["prefill", "decode", "prefill", "decode"],
            "t_start": [0.0, 2.0, 1.0, 3.0],
            "t_end": [2.0, 6.0, 3.0, 5.0],
            "prefill_tokens": [96, 0, 64, 0],
            "decode_tokens": [0, 4, 0, 2],
        }
    )


def _arrays(phases: pd.DataFrame):
    prepared = prepare_trace(phases, n_pad=N_PAD)
    return prepared, jax.tree.map(jnp.asarray, prepared.arrays)


# ---------------------------------------------------------------------------
# finite differences: all perturbations of one trace in one vmapped fit


HUBER_SCALE = 0.01  # seconds; a fixed scale (the automatic one is a median)


@functools.cache
def _batched_fit(algo: str):
    def one(arrays, inputs):
        moved = arrays._replace(
            t_start=inputs.t_start, t_end=inputs.t_end, tokens=inputs.tokens
        )
        if algo == "baseline":
            return fit_baseline_arrays(moved, CHUNK, weight=inputs.weight).beta
        if algo == "baseline-huber":
            return fit_baseline_arrays(
                moved,
                CHUNK,
                weight=inputs.weight,
                loss="huber",
                huber_scale=HUBER_SCALE,
            ).beta
        fit = fit_iterative_arrays(
            moved, CHUNK, max_outer_iters=FD_ITERS, tol=0.0, weight=inputs.weight
        )
        return fit.beta

    return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def _central_differences(algo, arrays, steps: dict[str, float], rows, beta):
    """d beta / d input for every (input, row) by central differences.

    ``beta`` is the fit at the unperturbed inputs, which the padding entries
    of the batch must reproduce. Returns {input name: [3, len(rows)]}.
    """
    base = fit_inputs(arrays)
    names = list(steps)
    batch = []
    for name in names:
        for row in rows:
            for sign in (1.0, -1.0):
                leaf = getattr(base, name).at[row].add(sign * steps[name])
                batch.append(base._replace(**{name: leaf}))
    size = 8 * N_PAD  # one compiled batch size for every trace
    assert len(batch) <= size
    batch += [base] * (size - len(batch))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batch)
    betas = np.asarray(_batched_fit(algo)(arrays, stacked))
    np.testing.assert_allclose(betas[-1], beta, rtol=1e-9, atol=1e-18)
    out, k = {}, 0
    for name in names:
        plus = betas[k : k + 2 * len(rows) : 2]
        minus = betas[k + 1 : k + 2 * len(rows) : 2]
        out[name] = ((plus - minus) / (2 * steps[name])).T
        k += 2 * len(rows)
    return out


def _min_gap(prepared) -> float:
    n = prepared.n_phases
    times = np.unique(
        np.concatenate([prepared.arrays.t_start[:n], prepared.arrays.t_end[:n]])
    )
    return float(np.min(np.diff(times)))


def _assert_close_rows(actual, expected, what):
    """Relative error per beta, in the 2-norm over phases."""
    for j in range(3):
        scale = np.linalg.norm(expected[j])
        error = np.linalg.norm(actual[j] - expected[j])
        if scale == 0:
            assert error == 0, f"{what}, beta{j}: expected exact zeros"
        else:
            assert error <= FD_REL_TOL * scale, (
                f"{what}, beta{j}: relative error {error / scale:.2e}"
            )


PER_PHASE_TRACES = [
    # beta2 is held at 0 on this one (the others have all three positive).
    ("random", lambda: random_trace(30, 2)),
    ("simulated-poisson", lambda: simulated_trace(26, 3, jitter=2e-4)),
    (
        "simulated-bursty",
        lambda: simulated_trace(26, 4, jitter=2e-4, arrival="bursty", burst_size=4),
    ),
]


@pytest.mark.parametrize("algo", ["baseline", "iterative"])
@pytest.mark.parametrize(
    "name, make", PER_PHASE_TRACES, ids=[t[0] for t in PER_PHASE_TRACES]
)
@_x64
def test_per_phase_derivatives_match_finite_differences(algo, name, make):
    prepared, arrays = _arrays(make())
    n = prepared.n_phases
    assert n <= N_PAD
    if algo == "baseline":
        fit, jacobian = baseline_sensitivity_arrays(arrays, CHUNK)
    else:
        result = iterative_sensitivity_arrays(arrays, CHUNK, **TIGHT, **ADJOINT)
        assert int(result.fit.stop_code) == 0, "the fit must converge"
        assert bool(np.all(result.adjoint.solved))
        fit, jacobian = result.fit, result.jacobian
    beta = np.asarray(fit.beta)
    h = _min_gap(prepared) * FD_GAP_FRACTION
    steps = {"t_start": h, "t_end": h, "weight": 1e-4}
    rows = list(range(n))
    numeric = _central_differences(algo, arrays, steps, rows, beta)
    for key in steps:
        analytic = np.asarray(getattr(jacobian, key))[:, :n]
        _assert_close_rows(analytic, numeric[key], f"{name} {key}")
    # Tokens: a prompt at a multiple of C sits on a step of ceil(P / C).
    tokens = prepared.arrays.tokens[:n]
    smooth = ~(prepared.arrays.is_prefill[:n] & (tokens % CHUNK == 0))
    token_rows = [i for i in range(n) if smooth[i]]
    numeric = _central_differences(algo, arrays, {"tokens": 1e-3}, token_rows, beta)
    analytic = np.asarray(jacobian.tokens)[:, token_rows]
    _assert_close_rows(analytic, numeric["tokens"], f"{name} tokens")


@_x64
def test_huber_derivatives_match_finite_differences():
    """The implicit derivative of the Huber optimum (not of the IRLS rounds),
    with one corrupted phase so that some residuals exceed the scale."""
    phases = stretched_trace()
    prepared, arrays = _arrays(phases)
    n = prepared.n_phases
    fit, jacobian = baseline_sensitivity_arrays(
        arrays, CHUNK, loss="huber", huber_scale=HUBER_SCALE
    )
    design = np.stack([fit.steps, fit.exposure_prefill, fit.exposure_decode], axis=1)
    residual = np.asarray(fit.duration - design @ fit.beta)[:n]
    assert np.any(np.abs(residual) > HUBER_SCALE), "the Huber loss should be active"
    h = _min_gap(prepared) * FD_GAP_FRACTION
    steps = {"t_start": h, "t_end": h, "weight": 1e-4}
    numeric = _central_differences(
        "baseline-huber", arrays, steps, list(range(n)), np.asarray(fit.beta)
    )
    for key in steps:
        analytic = np.asarray(getattr(jacobian, key))[:, :n]
        _assert_close_rows(analytic, numeric[key], f"huber {key}")


@pytest.mark.parametrize("algo", ["baseline", "iterative"])
@_x64
def test_boundary_view_matches_moving_a_shared_timestamp(algo):
    phases = simulated_trace(26, 5)
    prepared, arrays = _arrays(phases)
    n = prepared.n_phases
    sens = sensitivity(phases, chunk_size=CHUNK, algo=algo, **_options(algo))
    table = boundary_sensitivity(sens)
    assert (table["n_boundaries"] > 1).any(), "the trace should have ties"
    assert table["n_boundaries"].sum() == 2 * n

    # Move every boundary at a shared timestamp together (the padding rows
    # sit at the last timestamp and are left alone: they are masked out).
    times = np.concatenate([phases["t_start"], phases["t_end"]])
    shared = table.index[table["n_boundaries"] > 1][:60]
    h = _min_gap_values(times) * FD_GAP_FRACTION
    base = fit_inputs(arrays)
    batch = []
    origin = prepared.origin
    for value in shared:
        for sign in (1.0, -1.0):
            at_start = np.flatnonzero(phases["t_start"].to_numpy() == value)
            at_end = np.flatnonzero(phases["t_end"].to_numpy() == value)
            assert np.all(prepared.arrays.t_start[at_start] == value - origin)
            batch.append(
                base._replace(
                    t_start=base.t_start.at[at_start].add(sign * h),
                    t_end=base.t_end.at[at_end].add(sign * h),
                )
            )
    batch += [base] * (8 * N_PAD - len(batch))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batch)
    betas = np.asarray(_batched_fit(algo)(arrays, stacked))
    np.testing.assert_allclose(betas[-1], sens.attrs["beta"], rtol=1e-9, atol=1e-18)
    betas = betas[: 2 * len(shared)]
    numeric = ((betas[0::2] - betas[1::2]) / (2 * h)).T
    analytic = table.loc[shared, ["dbeta0_dt", "dbeta1_dt", "dbeta2_dt"]].to_numpy().T
    _assert_close_rows(analytic, numeric, f"{algo} shared timestamps")


def _min_gap_values(times) -> float:
    return float(np.min(np.diff(np.unique(times))))


def _options(algo):
    if algo == "baseline":
        return {}
    return {**TIGHT, **ADJOINT}


@_x64
def test_coefficients_held_at_zero_have_zero_sensitivity():
    prepared, arrays = _arrays(toy_trace())
    fit, jacobian = baseline_sensitivity_arrays(arrays, CHUNK)
    assert float(fit.beta[2]) == 0.0 and float(fit.beta[0]) > 0
    for leaf in jacobian:
        assert np.all(np.asarray(leaf)[2] == 0.0)
        assert np.any(np.asarray(leaf)[0] != 0.0)
    result = iterative_sensitivity_arrays(arrays, CHUNK, **TIGHT, **ADJOINT)
    assert int(result.fit.stop_code) == 0
    assert float(result.fit.beta[0]) == 0.0 and float(result.fit.beta[1]) > 0
    for leaf in result.jacobian:
        assert np.all(np.asarray(leaf)[0] == 0.0)
        assert np.any(np.asarray(leaf)[1] != 0.0)


def _forward_and_reverse(function, inputs, direction, cotangent):
    """(cotangent . J direction, J^T cotangent) from one linearisation."""
    value, tangent_map = jax.linearize(function, inputs)
    (gradient,) = jax.linear_transpose(tangent_map, inputs)(cotangent)
    return value, cotangent @ tangent_map(direction), gradient


@_x64
def test_forward_and_reverse_mode_agree():
    prepared, arrays = _arrays(simulated_trace(26, 3, jitter=2e-4))
    inputs = fit_inputs(arrays)
    rng = np.random.default_rng(0)
    valid = np.asarray(arrays.valid, dtype=float)
    direction = FitInputs(
        *(jnp.asarray(rng.normal(size=N_PAD) * valid) for _ in range(4))
    )
    cotangent = jnp.asarray(rng.normal(size=3))

    def bilinear_forms_agree(function):
        value, forward, gradient = jax.jit(_forward_and_reverse, static_argnums=0)(
            function, inputs, direction, cotangent
        )
        reverse = sum(jnp.vdot(g, u) for g, u in zip(gradient, direction, strict=True))
        assert float(forward) == pytest.approx(float(reverse), rel=1e-9)
        return value, gradient

    # Baseline: plain autodiff through the fit.
    bilinear_forms_agree(
        functools.partial(baseline_beta, arrays=arrays, chunk_size=CHUNK)
    )

    # Iterative: custom_jvp + custom_linear_solve, transposed for reverse
    # mode; the reverse pass equals the hand-rolled one.
    def iterative(x):
        return iterative_beta(x, arrays, CHUNK, **TIGHT, **ADJOINT)

    beta, gradient = bilinear_forms_agree(iterative)
    explicit = iterative_sensitivity_arrays(arrays, CHUNK, **TIGHT, **ADJOINT)
    np.testing.assert_array_equal(beta, explicit.fit.beta)
    for g, jac in zip(gradient, explicit.jacobian, strict=True):
        np.testing.assert_allclose(g, cotangent @ jac, rtol=1e-8, atol=1e-16)


@pytest.mark.parametrize(
    "options",
    [dict(prefill_correction_mode="end", damping_eta=0.5),
     dict(loss="huber", huber_scale=HUBER_SCALE)],
    ids=["end-damped", "huber"],
)  # fmt: skip
@_x64
def test_eliminated_adjoint_matches_the_whole_system_solve(options):
    """The sensitivity table's adjoint (beta block eliminated, Schur
    complement in ptilde) equals reverse mode through the custom_linear_solve
    on the whole state (test_forward_and_reverse_mode_agree has the default
    settings): with damping, which changes the beta block, and a trace-only
    correction; and with the Huber loss active on a stretched phase. At the
    default tolerance each solve reports a residual below it."""
    phases = stretched_trace()
    _, arrays = _arrays(phases)
    explicit = iterative_sensitivity_arrays(
        arrays, CHUNK, **options, **TIGHT, **ADJOINT
    )
    assert int(explicit.fit.stop_code) == 0
    assert bool(np.all(explicit.adjoint.solved))
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=3))

    def projected(inputs):
        beta = iterative_beta(inputs, arrays, CHUNK, **options, **TIGHT, **ADJOINT)
        return cotangent @ beta

    gradient = jax.jit(jax.grad(projected))(fit_inputs(arrays))
    for g, rows in zip(gradient, explicit.jacobian, strict=True):
        expected = cotangent @ rows
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(g, expected, rtol=1e-8, atol=1e-9 * scale)
    default_tol = dict(ADJOINT, adjoint_tol=1e-6)
    default = iterative_sensitivity_arrays(
        arrays, CHUNK, **options, **TIGHT, **default_tol
    )
    assert np.all(np.asarray(default.adjoint.residual) <= 1e-6)
    assert np.all(np.asarray(default.adjoint.solved))
    assert np.all(np.asarray(default.adjoint.operator_products) >= 1)


@_x64
def test_a_loose_adjoint_tolerance_still_checks_and_pulls_back():
    """With the beta block eliminated, the zero start of the ptilde solve may
    already meet a loose tolerance; the solve must still end with a real
    check (which is also the pullback to the inputs), not return zeros."""
    _, arrays = _arrays(simulated_trace(26, 3, jitter=2e-4))
    tight = iterative_sensitivity_arrays(arrays, CHUNK, **TIGHT, **ADJOINT)
    loose_tol = dict(ADJOINT, adjoint_tol=0.5)
    loose = iterative_sensitivity_arrays(arrays, CHUNK, **TIGHT, **loose_tol)
    assert np.all(np.asarray(loose.adjoint.operator_products) >= 1)
    assert np.all(np.asarray(loose.adjoint.residual) <= 0.5)
    for rows, expected in zip(loose.jacobian, tight.jacobian, strict=True):
        scale = float(np.max(np.abs(expected)))
        # Zeros would be off by the whole scale; a first-order answer from
        # the zero start measured 13% off here (3% before the rows dropped
        # their ptilde pullback, which changed the start), tight ones 0.
        assert float(np.max(np.abs(np.asarray(rows) - expected))) < 0.5 * scale


@pytest.mark.parametrize(
    "mode, loss, damping",
    [("beta_informed", "squared", 1.0), ("end", "squared", 0.5),
     ("beta_informed", "huber", 1.0)],
)  # fmt: skip
@_x64
def test_staged_map_reproduces_mm_map(mode, loss, damping):
    """The two stages the adjoint solves linearise (_implicit._adjoint_jacobian)
    are mm_map, bit for bit, at a state off the fixed point, and the context
    rebuilt from its floating leaves is the context."""
    _, arrays = _arrays(simulated_trace(26, 3, jitter=2e-4))
    inputs = fit_inputs(arrays)
    settings = _typed(arrays, _Settings(CHUNK, 0.0, 1e-6, damping, None))
    fit = iterative_sensitivity_arrays(
        arrays, CHUNK, prefill_correction_mode=mode, loss=loss,
        damping_eta=damping,
    ).fit  # fmt: skip
    rng = np.random.default_rng(1)
    state = MMState(
        fit.beta * (1.0 + 0.1 * rng.uniform(-1, 1, 3)),
        fit.effective_prefill * (1.0 + 0.1 * rng.uniform(-1, 1, N_PAD * 2 - 1)),
    )
    expected = mm_map(
        state, inputs, arrays, CHUNK, prefill_correction_mode=mode,
        damping_eta=damping, loss=loss,
    )  # fmt: skip
    context = mm_context(_with_inputs(arrays, inputs), CHUNK, 0.0, mode, inputs.weight)
    floats, rebuild = _split_context(context)
    for leaf, again in zip(
        jax.tree.leaves(context), jax.tree.leaves(rebuild(floats)), strict=True
    ):
        np.testing.assert_array_equal(leaf, again)
    static = dict(init_via_baseline_correction="end", loss=loss)
    prefill = _prefill_stage(state, context, mode)
    beta = _beta_stage(state, prefill, context, settings, static)
    np.testing.assert_array_equal(prefill, expected.effective_prefill)
    np.testing.assert_array_equal(beta, expected.beta)


@_x64
def test_sensitivity_table_layout_and_ranking():
    phases = random_trace(20, 11)
    phases.index = pd.RangeIndex(100, 100 + len(phases))
    sens = sensitivity(phases, chunk_size=CHUNK, **TIGHT, **ADJOINT)
    assert list(sens.index) == list(phases.index)
    expected = [
        derivative_column(j, name)
        for name in ("t_start", "t_end", "weight", "tokens")
        for j in range(3)
    ]
    assert (
        list(sens.columns)
        == ["request_id", "phase_type", "t_start", "t_end"] + expected
    )
    assert sens.attrs["gradient_valid"] and sens.attrs["stop_reason"] == "converged"
    # Same numbers as the array level.
    prepared, arrays = _arrays(phases)
    result = iterative_sensitivity_arrays(arrays, CHUNK, **TIGHT, **ADJOINT)
    np.testing.assert_allclose(
        sens["dbeta1_dt_end"], np.asarray(result.jacobian.t_end)[1, : len(phases)]
    )
    top = top_influences(sens, beta="beta1", by="weight", k=5)
    assert len(top) == 5 and list(top["rank"]) == [1, 2, 3, 4, 5]
    magnitudes = sens["dbeta1_dweight"].abs()
    assert top["dbeta1_dweight"].abs().iloc[0] == magnitudes.max()
    assert np.all(np.diff(top["dbeta1_dweight"].abs().to_numpy()) <= 0)
    with pytest.raises(ValueError, match="by"):
        top_influences(sens, by="color")
    with pytest.raises(TypeError, match="unknown option"):
        sensitivity(phases, chunk_size=CHUNK, bogus=1)


@_x64
def test_unconverged_fit_is_flagged():
    phases = simulated_trace(26, 3, jitter=2e-4)
    with pytest.warns(UserWarning, match="not a fixed point"):
        sens = sensitivity(
            phases, chunk_size=CHUNK, **TIGHT, **ADJOINT, damping_eta=1e-3
        )  # far too much damping to converge within ITERS
    assert not sens.attrs["gradient_valid"]
    assert sens.attrs["stop_reason"] == "max_iters"


# ---------------------------------------------------------------------------
# bootstrap


def test_bootstrap_intervals_shrink_with_trace_size():
    small = jaxbeta.simulate(200, seed=1, chunk_size=64, noise_sigma=0.2).phases
    large = jaxbeta.simulate(2000, seed=1, chunk_size=64, noise_sigma=0.2).phases
    widths = []
    for phases in (small, large):
        result = bootstrap(
            phases, chunk_size=64, n_resamples=200, seed=3, algo="baseline",
            progress=False,
        )  # fmt: skip
        assert result.betas.shape == (200, 3)
        assert result.converged_share == 1.0
        intervals = result.intervals
        assert np.all(intervals["low"] <= intervals["high"])
        widths.append((intervals["high"] - intervals["low"]).to_numpy())
    # Ten times the requests: about sqrt(10) ~ 3.2 times narrower.
    assert np.all(widths[1] < 0.6 * widths[0]), widths


@functools.cache
def huber_trace() -> tuple[pd.DataFrame, tuple[float, float, float]]:
    """150 requests: 5 corrupted phases are a few percent of the rows, and
    their stretched windows change little of the others' concurrency."""
    sim = jaxbeta.simulate(
        150,
        seed=2,
        chunk_size=int(CHUNK),
        noise_sigma=0.05,
        output_dist=("lognormal", 20, 0.6, 2, 60),
    )
    return sim.phases, sim.beta


def test_bootstrap_iterative_is_reproducible_and_brackets_the_fit():
    phases, _ = huber_trace()
    first = bootstrap(phases, chunk_size=CHUNK, n_resamples=40, seed=9, progress=False)
    again = bootstrap(phases, chunk_size=CHUNK, n_resamples=40, seed=9, progress=False)
    np.testing.assert_array_equal(first.betas, again.betas)
    assert first.betas.shape == (40, 3)
    assert 0.0 < first.converged_share <= 1.0
    fit = jaxbeta.estimate_betas_iterative(phases, chunk_size=CHUNK)
    np.testing.assert_allclose(first.intervals["beta"], fit.beta, rtol=1e-9, atol=0)
    inside = (first.intervals["low"] <= fit.beta) & (
        fit.beta <= first.intervals["high"]
    )
    assert inside.all()


# ---------------------------------------------------------------------------
# Huber loss


def test_huber_with_a_huge_scale_is_squared_loss():
    phases, _ = huber_trace()
    squared = jaxbeta.estimate_betas_baseline(phases, chunk_size=CHUNK)
    huber = jaxbeta.estimate_betas_baseline(
        phases, chunk_size=CHUNK, loss="huber", huber_scale=1e6
    )
    np.testing.assert_allclose(huber.beta, squared.beta, rtol=1e-9, atol=1e-15)
    assert huber.settings["loss"] == "huber" and huber.settings["huber_scale"] == 1e6


@pytest.mark.parametrize("algo", ["baseline", "iterative"])
def test_huber_resists_corrupted_phases(algo):
    clean, truth = huber_trace()
    clean = clean.copy()
    rng = np.random.default_rng(0)
    corrupted = clean.copy()
    decode_rows = np.flatnonzero(corrupted["phase_type"] == "decode")
    rows = corrupted.index[rng.choice(decode_rows, 5, replace=False)]
    duration = corrupted.loc[rows, "t_end"] - corrupted.loc[rows, "t_start"]
    corrupted.loc[rows, "t_end"] = corrupted.loc[rows, "t_start"] + 10 * duration
    estimate = (
        jaxbeta.estimate_betas_baseline
        if algo == "baseline"
        else jaxbeta.estimate_betas_iterative
    )
    reference = estimate(clean, chunk_size=CHUNK).beta
    squared = estimate(corrupted, chunk_size=CHUNK).beta
    huber = estimate(corrupted, chunk_size=CHUNK, loss="huber").beta
    # Distance from the clean fit, each coefficient relative to the truth.
    squared_error = np.abs(squared - reference) / np.asarray(truth)
    huber_error = np.abs(huber - reference) / np.asarray(truth)
    assert np.sum(huber_error) < 0.5 * np.sum(squared_error), (
        squared_error,
        huber_error,
    )


def test_huber_arguments_are_checked():
    with pytest.raises(ValueError, match="loss"):
        jaxbeta.estimate_betas_baseline(toy_trace(), chunk_size=64, loss="l1")
    with pytest.raises(ValueError, match="huber_scale"):
        jaxbeta.estimate_betas_iterative(
            toy_trace(), chunk_size=64, loss="huber", huber_scale=-1.0
        )


def test_sensitivity_refuses_a_token_budget():
    # The implicit derivative does not model a token budget yet: refused,
    # not ignored.
    phases = random_trace(20, 11)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sensitivity(phases, chunk_size=CHUNK, max_num_batched_tokens=4 * CHUNK)
