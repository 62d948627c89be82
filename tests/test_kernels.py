"""Property tests of the array kernels against the plain loops of SPEC.md.

The traces are random and full of ties: timestamps mostly come from a coarse
integer or quarter-second grid, so starts and ends coincide often; some are
continuous, some sit near a Unix epoch. They mix prefill and decode rows,
requests with and without a decode row (and decode-only ones), prompts that
are multiples of C and prompts that are not, and sometimes an ``N_steps``
column. Every trace is padded to ``N_PAD`` rows so that each kernel compiles
once for the whole module.

jaxbeta's grid keeps tied timestamps as zero-length segments while the SPEC
loops use the distinct values, so per-segment signals are compared on
jaxbeta's segments of positive length, each of which is one SPEC segment.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from spec_loops import SpecTrace, exact_nnls

from jaxbeta import prepare_trace
from jaxbeta._baseline import baseline_exposures
from jaxbeta._boundary import PreparedTrace
from jaxbeta._correction import beta_informed_correction, missing_tokens
from jaxbeta._grid import (
    build_grid,
    phase_integral,
    phase_steps,
    prefix_integral,
    prefix_sum,
    prefix_sum_compensated,
)
from jaxbeta._iterative import mm_context, mm_step
from jaxbeta._nnls import solve_nnls

N_PAD = 32
MAX_REQUESTS = 8  # at most two rows each, so every trace fits in N_PAD
EPOCH = 1.7e9
COLUMNS = [
    "request_id",
    "phase_type",
    "t_start",
    "t_end",
    "prefill_tokens",
    "decode_tokens",
]
TRACE_ONLY_MODES = ("none", "uniform", "end")
# The MM step is costly to compile; "uniform" and "none" differ from "end"
# only in the fixed correction, which the baseline design test covers.
MM_MODES = ("beta_informed", "end")

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------
# Random traces


class TraceCase(NamedTuple):
    """A random phase table and the parameters it is fitted with."""

    table: pd.DataFrame
    chunk_size: float
    min_duration: float
    offset: float  # seconds added to every drawn timestamp (0 or EPOCH)


@st.composite
def trace_cases(draw) -> TraceCase:
    """Draws a small phase table with many tied timestamps.

    Args:
      draw: hypothesis' draw function.

    Returns:
      A :class:`TraceCase`; rows are shuffled, ids are ``req<k>``.
    """
    style = draw(st.sampled_from(("integer", "integer", "quantized", "continuous")))
    chunk = draw(st.sampled_from((1, 4, 16, 64)))
    offset = draw(st.sampled_from((0.0, 0.0, EPOCH)))

    def instant() -> float:
        if style == "integer":
            return float(draw(st.integers(0, 6)))
        if style == "quantized":
            return draw(st.integers(0, 24)) * 0.25
        return draw(st.floats(0.0, 10.0, allow_subnormal=False))

    def length() -> float:
        if style == "integer":
            return float(draw(st.integers(1, 3)))
        if style == "quantized":
            return draw(st.integers(1, 8)) * 0.25
        return draw(st.floats(1e-3, 4.0))

    with_n_steps = draw(st.booleans())
    rows = []
    for request in range(draw(st.integers(1, MAX_REQUESTS))):
        request_id = f"req{request}"
        shape = draw(st.sampled_from(("both", "both", "prefill only", "decode only")))
        decode_start = instant()
        if shape != "decode only":
            start = instant()
            end = start + length()
            prompt = draw(
                st.one_of(
                    st.integers(0, 4).map(lambda k: k * chunk),
                    st.integers(0, 5 * chunk),
                )
            )
            steps = max(math.ceil(prompt / chunk) + draw(st.integers(-1, 2)), 0)
            ignored = draw(st.integers(0, 9))  # decode_tokens of a prefill row
            rows.append(
                (request_id, "prefill", start, end, prompt, ignored, float(steps))
            )
            if draw(st.integers(0, 3)) > 0:
                decode_start = end
        if shape != "prefill only":
            decoded = draw(st.integers(0, 12))
            steps = max(decoded + draw(st.integers(-1, 1)), 0)
            ignored = draw(st.integers(0, 999))  # prefill_tokens of a decode row
            rows.append(
                (
                    request_id,
                    "decode",
                    decode_start,
                    decode_start + length(),
                    ignored,
                    decoded,
                    float(steps),
                )
            )
    order = draw(st.permutations(range(len(rows))))
    table = pd.DataFrame([rows[k] for k in order], columns=[*COLUMNS, "N_steps"])
    table["t_start"] += offset
    table["t_end"] += offset
    if not with_n_steps:
        table = table.drop(columns="N_steps")
    min_duration = draw(st.sampled_from((0.0, 0.0, 0.5, 2.0)))
    return TraceCase(table, float(chunk), min_duration, offset)


# --------------------------------------------------------------------------
# Helpers


def prepare(table: pd.DataFrame) -> PreparedTrace:
    """Validates and pads ``table`` to the module's common size ``N_PAD``."""
    return prepare_trace(table, n_pad=N_PAD)


def spec_trace(case: TraceCase, min_duration: float = 0.0) -> SpecTrace:
    """The SPEC loops on ``case``'s table in the trace's own time frame.

    The loops place t* (SPEC section 8) at ``g_j + remaining / lambda_j``;
    near a Unix epoch that sum rounds to 2.4e-7 s, far coarser than jaxbeta,
    which shifts to the trace origin first (SPEC section 10). So the loops
    get the table with the drawn offset removed, which is exact: with an
    epoch offset every timestamp lies within a factor of two of it
    (Sterbenz's lemma).
    """
    table = case.table.copy()
    table["t_start"] -= case.offset
    table["t_end"] -= case.offset
    return SpecTrace(table, case.chunk_size, min_duration)


def local_times(
    points: np.ndarray, prepared: PreparedTrace, case: TraceCase
) -> np.ndarray:
    """jaxbeta's grid points in the frame of :func:`spec_trace` (exactly)."""
    return (points + prepared.origin) - case.offset


def positive_segments(
    spec: SpecTrace, prepared: PreparedTrace, points: np.ndarray, case: TraceCase
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs jaxbeta's segments of positive length with SPEC segments.

    Args:
      spec: the SPEC loops of the case (see :func:`spec_trace`).
      prepared: the prepared trace (for its time origin).
      points: [M] jaxbeta's sorted grid points, relative to the origin.
      case: the trace case (for its offset).

    Returns:
      ``(own, unique)``: indices of jaxbeta's positive-length segments and,
      for each, the index of the SPEC segment with the same left end.
    """
    left = local_times(points, prepared, case)[:-1]
    own = np.flatnonzero(np.diff(points) > 0)
    unique = np.searchsorted(spec.grid, left[own])
    np.testing.assert_array_equal(spec.grid[unique], left[own])
    return own, unique


def mass_per_spec_segment(
    spec: SpecTrace,
    prepared: PreparedTrace,
    points: np.ndarray,
    rate: np.ndarray,
    case: TraceCase,
) -> np.ndarray:
    """Integral of a jaxbeta per-segment rate over each SPEC segment.

    Args:
      spec: the SPEC loops of the same table.
      prepared: the prepared trace.
      points: [M] jaxbeta's grid points.
      rate: [M - 1] jaxbeta's signal per segment (per second).
      case: the trace case.

    Returns:
      [S] integral of ``rate`` over each distinct segment of the SPEC grid.
    """
    own, unique = positive_segments(spec, prepared, points, case)
    mass = rate[own] * np.diff(points)[own]
    return np.bincount(unique, weights=mass, minlength=len(spec.length))


def jax_step_rate(
    spec_rate: np.ndarray, own: np.ndarray, unique: np.ndarray, filler: np.ndarray
) -> np.ndarray:
    """jaxbeta's per-segment step rate equal to ``spec_rate`` on real segments.

    Zero-length segments get the arbitrary values in ``filler``: they hold no
    time, so they must not change any result.
    """
    rate = np.array(filler, dtype=np.float64)
    rate[own] = spec_rate[unique]
    return rate


def assert_columns_close(actual, expected, rtol: float = 1e-9) -> None:
    """Each column within ``rtol`` relative plus 1e-12 of its largest value."""
    actual = np.asarray(actual, dtype=np.float64).reshape(len(expected), -1)
    expected = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    for column in range(expected.shape[1]):
        scale = np.max(np.abs(expected[:, column]), initial=0.0)
        np.testing.assert_allclose(
            actual[:, column],
            expected[:, column],
            rtol=rtol,
            atol=1e-12 * scale,
            err_msg=f"column {column}",
        )


# --------------------------------------------------------------------------
# Jitted kernels (each compiles once for N_PAD)


@jax.jit
def grid_and_pressure_windows(arrays, chunk_size):
    grid = build_grid(arrays)
    prefill = phase_integral(arrays, prefix_integral(grid, chunk_size * grid.n_prefill))
    decode = phase_integral(arrays, prefix_integral(grid, grid.n_decode))
    return grid, prefill, decode


baseline_design = jax.jit(baseline_exposures, static_argnames="correction_mode")


@jax.jit
def correction_by_request(arrays, chunk_size, step_rate):
    """The beta-informed correction of all requests and of each one alone."""
    grid = build_grid(arrays)
    steps = phase_steps(arrays, chunk_size)
    missing = missing_tokens(arrays, steps, chunk_size)

    def correction(only):
        return beta_informed_correction(grid, arrays, only, steps, step_rate)

    return (
        grid.points,
        missing,
        correction(missing),
        jax.vmap(correction)(jnp.diag(missing)),
    )


@functools.partial(jax.jit, static_argnames="mode")
def mm_step_features(arrays, chunk_size, beta, effective_prefill, mode):
    """Steps 1-4 of one outer MM step from (beta, ptilde^(m-1)).

    Only the features leave the function, so the NNLS solve of
    :func:`mm_step` is dead code, dropped before compiling (it would double
    the compile time).
    """
    context = mm_context(arrays, chunk_size, 0.0, mode)
    step = mm_step(context, beta, effective_prefill, mode)
    return (
        context.grid.points,
        context.steps,
        step.exposure_prefill,
        step.exposure_decode,
        step.effective_prefill,
    )


# --------------------------------------------------------------------------
# Grid, pressures and baseline design


@PROPERTY_SETTINGS
@given(case=trace_cases())
def test_grid_counts_and_pressure_windows_match_spec(case):
    spec = spec_trace(case)
    prepared = prepare(case.table)
    n = prepared.n_phases
    with jax.enable_x64(True):
        grid, prefill, decode = jax.device_get(
            grid_and_pressure_windows(prepared.arrays, np.float64(case.chunk_size))
        )
    own, unique = positive_segments(spec, prepared, grid.points, case)
    # Every distinct segment appears exactly once with positive length.
    np.testing.assert_array_equal(unique, np.arange(len(spec.length)))
    np.testing.assert_array_equal(grid.length[own], spec.length)
    np.testing.assert_array_equal(grid.n_prefill[own], spec.n_pf)
    np.testing.assert_array_equal(grid.n_decode[own], spec.n_dec)
    expected_prefill = [spec.window(i, case.chunk_size * spec.n_pf) for i in range(n)]
    expected_decode = [spec.window(i, spec.n_dec) for i in range(n)]
    assert_columns_close(prefill[:n], expected_prefill)
    assert_columns_close(decode[:n], expected_decode)
    np.testing.assert_array_equal(prefill[n:], 0.0)
    np.testing.assert_array_equal(decode[n:], 0.0)


@PROPERTY_SETTINGS
@given(case=trace_cases(), mode=st.sampled_from(TRACE_ONLY_MODES))
def test_baseline_design_matches_spec(case, mode):
    spec = spec_trace(case, case.min_duration)
    prepared = prepare(case.table)
    n = prepared.n_phases
    with jax.enable_x64(True):
        steps, duration, exposure_prefill, exposure_decode = jax.device_get(
            baseline_design(
                prepared.arrays,
                np.float64(case.chunk_size),
                np.float64(case.min_duration),
                correction_mode=mode,
            )
        )
    np.testing.assert_array_equal(steps[:n], spec.steps)
    # Shifting to the trace origin is exact, so durations are bit-identical.
    np.testing.assert_array_equal(duration[:n], spec.duration)
    design = np.stack([steps, exposure_prefill, exposure_decode], axis=1)
    assert_columns_close(design[:n], spec.baseline_design(mode))
    np.testing.assert_array_equal(design[n:], 0.0)
    np.testing.assert_array_equal(duration[n:], 1.0)


# --------------------------------------------------------------------------
# beta-informed correction (SPEC section 8)


def correction_setup(case: TraceCase, seed: int):
    """Runs the correction for random positive step rates on one trace.

    Returns:
      ``(spec, prepared, spec_rate, outputs)`` where ``outputs`` is the host
      copy of :func:`correction_by_request`.
    """
    spec = spec_trace(case)
    prepared = prepare(case.table)
    rng = np.random.default_rng(seed)
    spec_rate = 10.0 ** rng.uniform(-2.0, 2.0, size=len(spec.length))
    filler = 10.0 ** rng.uniform(-2.0, 2.0, size=2 * N_PAD - 1)
    chunk = np.float64(case.chunk_size)
    with jax.enable_x64(True):
        grid, _, _ = jax.device_get(grid_and_pressure_windows(prepared.arrays, chunk))
        own, unique = positive_segments(spec, prepared, grid.points, case)
        rate = jax_step_rate(spec_rate, own, unique, filler)
        outputs = jax.device_get(correction_by_request(prepared.arrays, chunk, rate))
    return spec, prepared, spec_rate, outputs


@PROPERTY_SETTINGS
@given(case=trace_cases(), seed=st.integers(0, 2**32 - 1))
def test_beta_informed_correction_matches_spec(case, seed):
    # Request by request. In the sum over all requests, jaxbeta's difference
    # array (a plain cumsum of +-mu_r / W_r) leaves a rounding residue on
    # later segments, outside every window; it can exceed 1e-12 of the
    # largest mass when one request's mu_r / W_r dwarfs the others'.
    spec, prepared, spec_rate, outputs = correction_setup(case, seed)
    points, _, _, per_request = outputs
    for i in np.flatnonzero(spec.is_prefill):
        actual = mass_per_spec_segment(spec, prepared, points, per_request[i], case)
        expected = spec.beta_informed_correction(spec_rate, rows=[i]) * spec.length
        assert_columns_close(actual, expected)


@PROPERTY_SETTINGS
@given(case=trace_cases(), seed=st.integers(0, 2**32 - 1))
def test_beta_informed_mass_is_mu_inside_the_last_step(case, seed):
    spec, prepared, spec_rate, outputs = correction_setup(case, seed)
    points, missing, correction, per_request = outputs
    n = prepared.n_phases
    np.testing.assert_array_equal(missing[:n], spec.missing())
    length = np.diff(points)
    local = local_times(points, prepared, case)
    left, right = local[:-1], local[1:]
    allowance = 1e-12 * case.chunk_size
    counted = (spec.missing() > 0) & (spec.steps > 0) & spec.is_prefill
    for i in range(n):
        mass = per_request[i] * length
        assert np.all(mass >= -allowance), f"row {i}: negative correction mass"
        expected_total = spec.missing()[i] if counted[i] else 0.0
        assert abs(mass.sum() - expected_total) <= allowance, (
            f"row {i}: mass {mass.sum()!r}, mu {expected_total!r}"
        )
        if not counted[i]:
            continue
        t_star = spec.last_step_start(i, spec_rate)
        assert t_star is not None  # positive rates: every counted request has t*
        outside = (right <= t_star) | (left >= spec.t_end[i])
        assert np.all(np.abs(mass[outside]) <= allowance), (
            f"row {i}: mass outside [t*, t_re) = [{t_star!r}, {spec.t_end[i]!r})"
        )
    total = (correction * length).sum()
    assert abs(total - spec.missing()[counted].sum()) <= allowance * n


# --------------------------------------------------------------------------
# One MM step (SPEC section 7, steps 1-4)

step_times = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))
prefill_token_times = st.one_of(st.just(0.0), st.floats(1e-6, 1e-2))


@PROPERTY_SETTINGS
@given(
    case=trace_cases(),
    mode=st.sampled_from(MM_MODES),
    beta=st.tuples(step_times, prefill_token_times, step_times).map(
        lambda beta: beta if any(beta) else (1e-3, *beta[1:])
    ),
)
def test_mm_step_features_match_spec(case, mode, beta):
    spec = spec_trace(case)
    prepared = prepare(case.table)
    n = prepared.n_phases
    chunk = np.float64(case.chunk_size)
    beta_array = np.asarray(beta, dtype=np.float64)
    spec_prefill = case.chunk_size * spec.n_pf
    with jax.enable_x64(True):
        grid, _, _ = jax.device_get(grid_and_pressure_windows(prepared.arrays, chunk))
    jax_prefill = chunk * grid.n_prefill  # the first step starts from p_pf_full
    # Two steps: the second uses the first one's ptilde (SPEC section 7's lag).
    for _ in range(2):
        with jax.enable_x64(True):
            points, steps, exposure_prefill, exposure_decode, jax_prefill = (
                jax.device_get(
                    mm_step_features(
                        prepared.arrays, chunk, beta_array, jax_prefill, mode=mode
                    )
                )
            )
        features, spec_prefill = spec.mm_features(beta, spec_prefill, mode)
        own, unique = positive_segments(spec, prepared, points, case)
        actual = np.stack([steps, exposure_prefill, exposure_decode], axis=1)
        assert_columns_close(actual[:n], features)
        np.testing.assert_array_equal(actual[n:], 0.0)
        assert_columns_close(jax_prefill[own], spec_prefill[unique])


# --------------------------------------------------------------------------
# NNLS


@st.composite
def nnls_problems(draw):
    """A well-conditioned design whose NNLS optimum is known by construction.

    Columns are scaled over six decades. On a random support the optimum is
    positive; off it, the target is pushed so that the gradient is strictly
    positive (KKT), so those coefficients are exactly 0 at the optimum.

    Returns:
      ``(design [n, 3], target [n], optimum [3])``.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_rows = draw(st.integers(4, 30))
    support = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    design = rng.uniform(0.1, 1.0, size=(n_rows, 3))
    design *= 10.0 ** rng.uniform(-2.0, 4.0, size=3)
    optimum = np.where(support, 10.0 ** rng.uniform(-3.0, 1.0, size=3), 0.0)
    optimum /= np.sqrt(np.sum(design**2, axis=0))
    target = design @ optimum
    if not support.all():
        on, off = design[:, support], design[:, ~support]
        if on.shape[1]:
            basis, _ = np.linalg.qr(on)
            off_perp = off - basis @ (basis.T @ off)
        else:
            off_perp = off
        gradient = rng.uniform(0.1, 1.0, size=off.shape[1]) * np.sum(off**2, axis=0)
        push = off_perp @ np.linalg.solve(off.T @ off_perp, gradient)
        size = np.linalg.norm(target) if support.any() else 1.0
        push *= size / np.linalg.norm(push) * draw(st.sampled_from((1e-3, 1.0)))
        target = target - push
    return design, target, optimum


def scaled_condition(design: np.ndarray) -> float:
    """Condition number of the design with unit-norm columns."""
    unit = design / np.sqrt(np.sum(design**2, axis=0))
    return float(np.linalg.cond(unit))


solve_nnls_jit = jax.jit(solve_nnls)


@settings(max_examples=40, deadline=None)
@given(problem=nnls_problems())
def test_nnls_reaches_the_exact_optimum_with_exact_zeros(problem):
    design, target, optimum = problem
    assume(scaled_condition(design) < 1e4)  # well-conditioned
    expected = exact_nnls(design, target)
    # Compare in column-scaled units (z_j = beta_j ||X[:, j]||), with the
    # parity README's floor: a coefficient is pinned only to the extent it
    # moves the fitted values, 1e-10 of the data norm. Unscaled relative
    # errors of a coefficient that contributes little are rounding noise.
    norms = np.sqrt(np.sum(design**2, axis=0))
    floor = 1e-10 * np.linalg.norm(target)
    np.testing.assert_allclose(expected * norms, optimum * norms, rtol=1e-8, atol=floor)
    with jax.enable_x64(True):
        solution = jax.device_get(solve_nnls_jit(design.T @ design, design.T @ target))
    assert solution.polished
    beta = np.asarray(solution.beta)
    zero = expected == 0.0
    assert np.all(beta[zero] == 0.0), f"not exactly 0: {beta[zero]!r}"
    np.testing.assert_allclose(
        (beta * norms)[~zero], (expected * norms)[~zero], rtol=1e-9, atol=floor
    )


@pytest.mark.parametrize("shape", [(5,), (33,), (1000,), (3, 70_000)])
def test_prefix_sum_derivatives_are_prefix_sums(shape):
    """The derivative rules of prefix_sum and prefix_sum_compensated use a
    differently blocked prefix sum (_grid._tangent_prefix_sum): the values
    stay those of the blocked sum, and both modes of the derivative agree
    with a sequential cumulative sum to rounding."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        values = jnp.asarray(rng.normal(size=shape))
        tangent = jnp.asarray(rng.normal(size=shape))
        expected_tangent = np.cumsum(np.asarray(tangent), axis=-1)
        expected_cotangent = np.cumsum(np.asarray(tangent)[..., ::-1], axis=-1)[
            ..., ::-1
        ]
        scale = np.sqrt(shape[-1])  # rounding of sums of unit normals
        for function in (prefix_sum, lambda v: prefix_sum_compensated(v)[0]):
            primal, forward = jax.jvp(function, (values,), (tangent,))
            np.testing.assert_allclose(
                primal, np.cumsum(np.asarray(values), axis=-1), atol=1e-12 * scale
            )
            np.testing.assert_allclose(forward, expected_tangent, atol=1e-12 * scale)
            _, pullback = jax.vjp(function, values)
            (reverse,) = pullback(tangent)
            np.testing.assert_allclose(reverse, expected_cotangent, atol=1e-12 * scale)
        # The value path is untouched by the derivative rule.
        np.testing.assert_array_equal(
            jax.jit(prefix_sum)(values),
            jax.jit(lambda v: jax.jvp(prefix_sum, (v,), (v,))[0])(values),
        )
