"""Iterative MM-style step-density reweighting (SPEC sections 7 and 8).

The whole fit is one ``lax.while_loop`` whose carry holds beta, the
effective prefill pressure of the previous iteration (the lag of SPEC
section 7, step 1), the iteration count, the last step size and fixed-size
history buffers, so it compiles once per (padded shape, ``max_outer_iters``,
correction modes) and vmaps over padded traces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbeta._arrays import PhaseArrays
from jaxbeta._baseline import FitStats, baseline_exposures, fit_stats
from jaxbeta._correction import (
    beta_informed_correction,
    missing_tokens,
    trace_only_correction,
)
from jaxbeta._grid import (
    Grid,
    build_grid,
    phase_durations,
    phase_integral_compensated,
    phase_steps,
    prefix_integral_compensated,
)
from jaxbeta._nnls import gram_system, solve_nnls
from jaxbeta._robust import auto_huber_scale, check_loss, huber_nnls

__all__ = [
    "ITERATIVE_MODES",
    "STOP_CODES",
    "IterativeFit",
    "fit_iterative_arrays",
    "stop_reason_name",
]

ITERATIVE_MODES = ("beta_informed", "end", "uniform", "none", "end_inside")
INIT_MODES = ("end", "uniform", "none", "end_inside")

# SPEC section 7: floor on the local step time Delta (seconds) and on lambda.
STEP_TIME_FLOOR = 1e-12
STEP_RATE_FLOOR = 1e-12

# Stop codes (see ``jaxbeta.StopReason``).
CONVERGED, MAX_ITERS, CYCLE, NON_FINITE = 0, 1, 2, 3
STOP_CODES = ("converged", "max_iters", "cycle", "non_finite")


def stop_reason_name(code: int) -> str:
    return STOP_CODES[int(code)]


def classify_stop(
    history_beta: jax.Array,
    iteration: jax.Array,
    finite: jax.Array,
    converged: jax.Array,
    close: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Why an MM loop stopped, as an index into :data:`STOP_CODES`.

    ``non_finite`` wins, then ``converged``; otherwise the loop hit its cap,
    and ``cycle`` says it was alternating between two states: the last point
    is ``close`` to the one two steps back, and so is its predecessor.

    Args:
      history_beta: [H + 1, 3] the points beta^(0..m) (NaN past ``iteration``).
      iteration: [] m, iterations executed.
      finite: [] bool, the last point is finite.
      converged: [] bool, the stop rule was met.
      close: ``(a, b) -> bool``, the stop rule's "within tol" test.

    Returns:
      [] int32 stop code.
    """
    back = [history_beta[jnp.maximum(iteration - k, 0)] for k in range(4)]
    cycling = (iteration >= 4) & close(back[0], back[2]) & close(back[1], back[3])
    return jnp.where(
        ~finite,
        NON_FINITE,
        jnp.where(converged, CONVERGED, jnp.where(cycling, CYCLE, MAX_ITERS)),
    ).astype(jnp.int32)


class IterativeFit(NamedTuple):
    """Array-level result of the MM fit (a pytree; vmaps over traces).

    ``H = max_outer_iters``; history rows past ``n_outer_iters`` are NaN.
    With the solver options of ``_fixed_point``, ``history_beta`` holds the
    points evaluated (accepted or not) and ``beta`` the returned estimate.
    """

    beta: jax.Array  # [3] last iterate beta^(m)
    init_beta: jax.Array  # [3] beta^(0), the baseline initialisation
    converged: jax.Array  # [] bool, d < tol was met
    n_outer_iters: jax.Array  # [] int32, iterations executed
    stop_code: jax.Array  # [] int32, index into STOP_CODES
    history_beta: jax.Array  # [H + 1, 3] beta^(0..H)
    history_delta: jax.Array  # [H] d = ||beta^(m) - beta^(m-1)||_2
    history_r2: jax.Array  # [H] r2 of each iteration's NNLS fit
    history_rmse: jax.Array  # [H] rmse (seconds) of each iteration's fit
    steps: jax.Array  # [n] N_i
    duration: jax.Array  # [n] T_i, seconds
    exposure_prefill: jax.Array  # [n] N_i * pbar_pf_i of the last iteration
    exposure_decode: jax.Array  # [n] N_i * pbar_dec_i of the last iteration
    stats: FitStats  # of the last iteration's NNLS fit
    lambda_floor_segments: jax.Array  # [H] segments at the Delta floor
    n_phases: jax.Array  # [] valid rows
    # [S] ptilde^(m) of the last iterate, tokens/step: with ``beta`` the full
    # MM state, the point at which the fit is differentiated implicitly.
    effective_prefill: jax.Array
    # jaxbeta's solver options (``_fixed_point``); the defaults fill them too.
    history_stop: jax.Array | None = None  # [H] the stop rule's measure
    n_fallbacks: jax.Array | None = None  # [] int32, rejected proposals


class _Carry(NamedTuple):
    iteration: jax.Array
    beta: jax.Array
    effective_prefill: jax.Array  # [S] ptilde^(m-1), tokens per step
    delta: jax.Array
    finite: jax.Array
    history_beta: jax.Array
    history_delta: jax.Array
    history_r2: jax.Array
    history_rmse: jax.Array
    floor_hits: jax.Array
    exposure_prefill: jax.Array
    exposure_decode: jax.Array
    stats: FitStats


def _weighted_features(
    grid: Grid,
    arrays: PhaseArrays,
    steps: jax.Array,
    step_rate: jax.Array,
    effective_prefill: jax.Array,
    running_steps: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Step-averaged exposures N_i * pbar_pf_i and N_i * pbar_dec_i (step 4).

    Window integrals come from compensated (double-double) running sums: a
    segment at the step-time floor adds ~1e12 steps/s x its length to the
    running sum, and plain float64 differences of later windows would lose
    up to 1e-6 of their value (the reference does; see the parity README).
    """

    window_steps = phase_integral_compensated(arrays, running_steps)
    prefill_mass, decode_mass = (
        phase_integral_compensated(arrays, prefix_integral_compensated(grid, rate))
        for rate in (effective_prefill * step_rate, grid.n_decode * step_rate)
    )
    positive = window_steps > 0
    safe = jnp.where(positive, window_steps, 1.0)
    mean_prefill = jnp.where(positive, prefill_mass / safe, 0.0)
    mean_decode = jnp.where(positive, decode_mass / safe, 0.0)
    valid = arrays.valid
    return (
        jnp.where(valid, steps * mean_prefill, 0.0),
        jnp.where(valid, steps * mean_decode, 0.0),
    )


class MMContext(NamedTuple):
    """Everything the outer MM step needs that does not change between
    iterations (computed once per fit)."""

    grid: Grid
    arrays: PhaseArrays
    steps: jax.Array  # [n] N_i
    duration: jax.Array  # [n] T_i, seconds (regression target)
    row_weight: jax.Array  # [n] least-squares weights (0 on padding)
    prefill_pressure: jax.Array  # [S] p_pf_full = C * n_pf, tokens/step
    decode_pressure: jax.Array  # [S] p_dec = n_dec, tokens/step
    missing: jax.Array  # [n] mu_r, tokens
    fixed_correction: jax.Array  # [S] trace-only c (unused for beta_informed)
    busy: jax.Array  # [S] bool, some phase is active on the segment
    prefill_cap: jax.Array  # [S] prefill tokens/step the token budget leaves
    # (B - p_dec); +inf without a budget (see budget_prefill_cap)

    @property
    def initial_prefill(self) -> jax.Array:
        """ptilde^(0) [S]: p_pf_full, capped by the token budget if any."""
        return jnp.minimum(self.prefill_pressure, self.prefill_cap)


class MMStep(NamedTuple):
    """Output of one outer MM step (SPEC section 7, steps 1-5)."""

    fit_beta: jax.Array  # [3] NNLS solution beta_fit (before damping)
    effective_prefill: jax.Array  # [S] ptilde^(m), tokens/step
    exposure_prefill: jax.Array  # [n] N_i * pbar_pf_i
    exposure_decode: jax.Array  # [n] N_i * pbar_dec_i
    stats: FitStats
    floor_hits: jax.Array  # [] int32, positive segments at the Delta floor


def budget_prefill_cap(grid: Grid, token_budget: jax.Array | None) -> jax.Array:
    """Most prefill tokens one step can take on each segment (an extension).

    An engine with a per-step token budget B (vLLM's
    ``max_num_batched_tokens``) serves every running decode first (one token
    each) and hands the rest out as prefill chunks, so a step on segment j
    takes at most ``B - p_dec[j]`` prefill tokens. Without a budget the cap
    is +inf and ``min(ptilde, cap)`` leaves ptilde unchanged bit for bit.

    Args:
      grid: the trace's grid.
      token_budget: B, tokens per step (scalar), or None.

    Returns:
      [S] tokens per step (>= 0).
    """
    if token_budget is None:
        return jnp.full_like(grid.length, jnp.inf)
    return jnp.maximum(token_budget - grid.n_decode, 0.0)


def budget_bound_prefill(
    grid: Grid, arrays: PhaseArrays, demand: jax.Array, prefill_cap: jax.Array
) -> jax.Array:
    """Prefill rows whose step count the token budget may have changed.

    On a segment where the chunks asked for (``demand``, C per running
    prefill) exceed ``prefill_cap``, some prefill gets a cut chunk or none,
    so a prefill phase that overlaps such a segment may have taken more than
    ``ceil(P / C)`` steps. Rows with an ``N_steps`` value keep their given
    count and are not flagged.

    Args:
      grid: the trace's grid.
      arrays: the trace.
      demand: [S] ``C * n_pf``, tokens per step.
      prefill_cap: [S] from :func:`budget_prefill_cap`.

    Returns:
      [n] bool, True on prefill rows (without ``N_steps``) whose window
      holds a segment of positive length where the budget binds.
    """
    binding = (demand > prefill_cap) & (grid.length > 0)
    # Integer counts: exact in any summation order.
    running = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), jnp.cumsum(binding.astype(jnp.int32))]
    )
    touched = running[arrays.end_rank] > running[arrays.start_rank]
    return arrays.valid & arrays.is_prefill & ~arrays.has_n_steps & touched


@jax.jit
def budget_bound_rows(
    arrays: PhaseArrays, chunk_size: jax.Array, token_budget: jax.Array
) -> jax.Array:
    """[n] bool: the rows a fit with this ``token_budget`` gives weight 0
    (:func:`budget_bound_prefill` on the trace's own grid)."""
    grid = build_grid(arrays)
    return budget_bound_prefill(
        grid,
        arrays,
        chunk_size * grid.n_prefill,
        budget_prefill_cap(grid, token_budget),
    )


def mm_context(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array,
    prefill_correction_mode: str,
    weight: jax.Array | None = None,
    token_budget: jax.Array | None = None,
) -> MMContext:
    """Precomputes the iteration-invariant quantities of an MM fit.

    With a ``token_budget`` (an extension of SPEC section 7, see
    :func:`budget_prefill_cap`) every ptilde is capped at ``B - p_dec`` and
    the prefill rows whose step counts the budget may have changed
    (:func:`budget_bound_prefill`) get weight 0: their ``ceil(P / C)`` is no
    longer their step count.
    """
    grid = build_grid(arrays)
    steps = phase_steps(arrays, chunk_size)
    duration = phase_durations(arrays, min_duration_sec)
    row_weight = arrays.valid.astype(duration.dtype)
    if weight is not None:
        row_weight = row_weight * weight
    prefill_pressure = chunk_size * grid.n_prefill
    prefill_cap = budget_prefill_cap(grid, token_budget)
    if token_budget is not None:
        uncertain = budget_bound_prefill(grid, arrays, prefill_pressure, prefill_cap)
        row_weight = jnp.where(uncertain, 0.0, row_weight)
    missing = missing_tokens(arrays, steps, chunk_size)
    if prefill_correction_mode == "beta_informed":
        fixed_correction = jnp.zeros_like(grid.length)
    else:
        fixed_correction = trace_only_correction(
            grid, arrays, missing, prefill_correction_mode
        )
    return MMContext(
        grid=grid,
        arrays=arrays,
        steps=steps,
        duration=duration,
        row_weight=row_weight,
        prefill_pressure=prefill_pressure,
        decode_pressure=grid.n_decode,
        missing=missing,
        fixed_correction=fixed_correction,
        # Segments inside no phase never enter a window integral; zeroing
        # their step rate keeps the floor (lambda = 1e12 on idle gaps) out of
        # the running sums, where it would cancel away the digits of later
        # windows.
        busy=(grid.n_prefill + grid.n_decode) > 0,
        prefill_cap=prefill_cap,
    )


def step_rates(
    context: MMContext, beta: jax.Array, effective_prefill: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Local step rates lambda = 1 / Delta on every segment (SPEC 7, step 1).

    Args:
      context: from :func:`mm_context`.
      beta: [3] (s/step, s/token, s/token).
      effective_prefill: [S] ptilde, tokens per step.

    Returns:
      ``(full_step_rate [S], step_rate [S], floor_hits [])``: lambda in steps
      per second on every segment; the same, zeroed on segments inside no
      phase; and the number of busy, positive-length segments whose step time
      sits at the 1e-12 s floor.
    """
    step_time = beta[0] + beta[1] * effective_prefill
    step_time = step_time + beta[2] * context.decode_pressure
    at_floor = step_time < STEP_TIME_FLOOR
    full_step_rate = 1.0 / jnp.maximum(step_time, STEP_TIME_FLOOR)
    step_rate = jnp.where(context.busy, full_step_rate, 0.0)
    floor_hits = jnp.sum(
        at_floor & context.busy & (context.grid.length > 0), dtype=jnp.int32
    )
    return full_step_rate, step_rate, floor_hits


def lagged_effective_prefill(
    context: MMContext,
    full_step_rate: jax.Array,
    step_rate: jax.Array,
    prefill_correction_mode: str,
    running_steps: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """ptilde^(m) from the frozen rates of ptilde^(m-1) (SPEC 7, steps 2-3).

    Args:
      running_steps: optional ``prefix_integral_compensated(grid, step_rate)``
        shared with :func:`mm_design`.

    Returns:
      [S] tokens per step.
    """
    if prefill_correction_mode == "beta_informed":
        correction = beta_informed_correction(
            context.grid,
            context.arrays,
            context.missing,
            context.steps,
            step_rate,
            running_steps,
        )
    else:
        correction = context.fixed_correction
    uncapped = jnp.maximum(
        context.prefill_pressure
        - correction / jnp.maximum(full_step_rate, STEP_RATE_FLOOR),
        0.0,
    )
    return jnp.minimum(uncapped, context.prefill_cap)


def mm_design(
    context: MMContext,
    step_rate: jax.Array,
    effective_prefill: jax.Array,
    running_steps: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """NNLS design ``[N_i, N_i pbar_pf_i, N_i pbar_dec_i]`` (SPEC 7, steps 4-5).

    Args:
      context: from :func:`mm_context`.
      step_rate: [S] lambda weighting the pressures, steps per second.
      effective_prefill: [S] ptilde, tokens per step.
      running_steps: optional ``prefix_integral_compensated(grid, step_rate)``.

    Returns:
      [n, 3] design rows (0 on padding rows).
    """
    if running_steps is None:
        running_steps = prefix_integral_compensated(context.grid, step_rate)
    exposure_prefill, exposure_decode = _weighted_features(
        context.grid,
        context.arrays,
        context.steps,
        step_rate,
        effective_prefill,
        running_steps,
    )
    return jnp.stack([context.steps, exposure_prefill, exposure_decode], axis=1)


def mm_step(
    context: MMContext,
    beta: jax.Array,
    effective_prefill: jax.Array,
    prefill_correction_mode: str,
    init: jax.Array | None = None,
    huber_delta: jax.Array | None = None,
) -> MMStep:
    """One outer MM step from (beta^(m-1), ptilde^(m-1)) (SPEC section 7).

    Args:
      context: from :func:`mm_context`.
      beta: [3] beta^(m-1).
      effective_prefill: [S] ptilde^(m-1) (the lag of step 1).
      prefill_correction_mode: static correction mode.
      init: [3] NNLS warm start (default ``beta``).
      huber_delta: Huber scale in seconds for a robust step-5 fit; ``None``
        (default) fits squared loss.

    Returns:
      An :class:`MMStep`.
    """
    full_step_rate, step_rate, floor_hits = step_rates(context, beta, effective_prefill)
    # Running integral of lambda, shared by the correction and the features.
    running_steps = prefix_integral_compensated(context.grid, step_rate)
    new_effective_prefill = lagged_effective_prefill(
        context, full_step_rate, step_rate, prefill_correction_mode, running_steps
    )
    design = mm_design(context, step_rate, new_effective_prefill, running_steps)
    gram, rhs = gram_system(design, context.duration, context.row_weight)
    solution = solve_nnls(gram, rhs, init=beta if init is None else init)
    if huber_delta is not None:
        solution = huber_nnls(
            design, context.duration, context.row_weight, huber_delta, solution.beta
        )
    stats = fit_stats(
        design, context.duration, context.row_weight, solution.beta,
        solution.cond_scaled,
    )  # fmt: skip
    return MMStep(
        fit_beta=solution.beta,
        effective_prefill=new_effective_prefill,
        exposure_prefill=design[:, 1],
        exposure_decode=design[:, 2],
        stats=stats,
        floor_hits=floor_hits,
    )


def initial_beta(
    context: MMContext,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array,
    init_via_baseline_correction: str,
    huber_delta: jax.Array | None = None,
) -> jax.Array:
    """beta^(0): the baseline estimate with the init correction mode (its
    Huber fit when ``huber_delta`` is given)."""
    design = _initial_design(
        context, chunk_size, min_duration_sec, init_via_baseline_correction
    )
    gram, rhs = gram_system(design, context.duration, context.row_weight)
    solution = solve_nnls(gram, rhs)
    if huber_delta is None:
        return solution.beta
    return huber_nnls(
        design, context.duration, context.row_weight, huber_delta, solution.beta
    ).beta


def _initial_design(context, chunk_size, min_duration_sec, init_mode) -> jax.Array:
    _, _, init_prefill, init_decode = baseline_exposures(
        context.arrays,
        chunk_size,
        min_duration_sec,
        init_mode,
        prefill_cap=context.prefill_cap,
    )
    return jnp.stack([context.steps, init_prefill, init_decode], axis=1)


def initial_huber_scale(
    context: MMContext,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array,
    init_via_baseline_correction: str,
) -> jax.Array:
    """The iterative fit's automatic Huber scale (seconds): ``1.345 * 1.4826 *
    median |r_i|`` over the squared-loss initialisation fit, fixed per fit."""
    design = _initial_design(
        context, chunk_size, min_duration_sec, init_via_baseline_correction
    )
    gram, rhs = gram_system(design, context.duration, context.row_weight)
    beta = solve_nnls(gram, rhs).beta
    return auto_huber_scale(design, context.duration, context.row_weight, beta)


@functools.partial(
    jax.jit,
    static_argnames=(
        "prefill_correction_mode",
        "init_via_baseline_correction",
        "max_outer_iters",
        "loss",
        "solver",
        "stop_rule",
        "prefill_update",
        "anderson_memory",
        "inner_iters",
    ),
)
def fit_iterative_arrays(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    prefill_correction_mode: str = "beta_informed",
    max_outer_iters: int = 25,
    tol: jax.Array = 1e-6,
    damping_eta: jax.Array = 1.0,
    init_via_baseline_correction: str = "end",
    weight: jax.Array | None = None,
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
    solver: str = "picard",
    stop_rule: str = "absolute",
    prefill_update: str = "lagged",
    anderson_memory: int = 3,
    inner_iters: int = 4,
    accelerate_below: jax.Array = 0.05,
    token_budget: jax.Array | None = None,
) -> IterativeFit:
    """MM fit of one padded trace: pure, jit-ed, vmap-able (SPEC section 7).

    Args:
      arrays: the padded trace.
      chunk_size: C, prefill tokens per step.
      min_duration_sec: lower clamp on T_i, seconds.
      prefill_correction_mode: static; ``beta_informed`` (default), ``end``,
        ``uniform``, ``none`` or ``end_inside``.
      max_outer_iters: static iteration cap (> 0); sizes the history.
      tol: stop when ``||beta^(m) - beta^(m-1)||_2 < tol`` (seconds).
      damping_eta: eta in (0, 1].
      init_via_baseline_correction: static; correction mode of the baseline
        initialisation.
      weight: optional [n] row weights in every least-squares fit.
      loss: static; ``squared`` (default, SPEC section 7) or ``huber``: every
        NNLS fit, the initialisation included, minimises the Huber loss.
      huber_scale: Huber delta in seconds, fixed for the whole fit; default
        ``1.345 * 1.4826 * median |r_i|`` of the squared-loss initialisation.
      solver: static; ``picard`` (default: the reference's iteration),
        ``anderson`` or ``newton`` (safeguarded accelerations; see
        ``jaxbeta._fixed_point``).
      stop_rule: static; ``absolute`` (default: ``||d||_2 < tol`` in seconds)
        or ``relative`` (every coefficient's change below ``tol`` of its own
        size; coefficients at 0 never block).
      prefill_update: static; ``lagged`` (default: ptilde from the previous
        iteration's step rate) or ``consistent`` (ptilde solved for the
        current beta, so the fixed-point variable is beta alone).
      anderson_memory: static; past differences kept by ``anderson`` (>= 1).
      inner_iters: static; ``consistent`` sweeps per outer iteration for
        ``beta_informed`` (the trace-only corrections need none).
      accelerate_below: ``anderson``/``newton`` take plain damped steps until
        every coefficient's Picard step is below this fraction of its size,
        then accelerate (far from the fixed point T is strongly nonlinear and
        an extrapolated step lands on the NNLS bounds).
      token_budget: the engine's per-step token budget B (vLLM's
        ``max_num_batched_tokens``), or None (default: no budget, SPEC
        section 7). An extension: ptilde is capped at ``B - p_dec`` and
        prefill rows whose step count the budget may have changed get
        weight 0 (:func:`mm_context`).

    Returns:
      An :class:`IterativeFit`. With the default solver options it runs
      exactly the reference's loop; any other ``solver``/``stop_rule``/
      ``prefill_update`` runs ``jaxbeta._fixed_point.fit_fixed_point_arrays``
      (squared loss only).
    """
    if (solver, stop_rule, prefill_update) != ("picard", "absolute", "lagged"):
        if check_loss(loss) != "squared":
            raise ValueError(
                "loss='huber' works with the default solver options only "
                "(solver='picard', stop_rule='absolute', prefill_update='lagged')"
            )
        from jaxbeta._fixed_point import fit_fixed_point_arrays

        return fit_fixed_point_arrays(
            arrays,
            chunk_size,
            min_duration_sec,
            prefill_correction_mode,
            max_outer_iters,
            tol,
            damping_eta,
            init_via_baseline_correction,
            weight,
            solver=solver,
            stop_rule=stop_rule,
            prefill_update=prefill_update,
            anderson_memory=anderson_memory,
            inner_iters=inner_iters,
            accelerate_below=accelerate_below,
            token_budget=token_budget,
        )
    context = mm_context(
        arrays,
        chunk_size,
        min_duration_sec,
        prefill_correction_mode,
        weight,
        token_budget=token_budget,
    )
    duration = context.duration
    dtype = duration.dtype
    huber_delta = None
    if check_loss(loss) == "huber":
        huber_delta = huber_scale
        if huber_delta is None:
            huber_delta = initial_huber_scale(
                context, chunk_size, min_duration_sec, init_via_baseline_correction
            )
    init_beta = initial_beta(
        context,
        chunk_size,
        min_duration_sec,
        init_via_baseline_correction,
        huber_delta=huber_delta,
    )

    def outer_step(carry: _Carry) -> _Carry:
        beta = carry.beta
        step = mm_step(
            context,
            beta,
            carry.effective_prefill,
            prefill_correction_mode,
            huber_delta=huber_delta,
        )
        new_beta = (1.0 - damping_eta) * beta + damping_eta * step.fit_beta
        delta = jnp.linalg.norm(new_beta - beta)
        m = carry.iteration
        return _Carry(
            iteration=m + 1,
            beta=new_beta,
            effective_prefill=step.effective_prefill,
            delta=delta,
            finite=jnp.all(jnp.isfinite(new_beta)),
            history_beta=carry.history_beta.at[m + 1].set(new_beta),
            history_delta=carry.history_delta.at[m].set(delta),
            history_r2=carry.history_r2.at[m].set(step.stats.r2),
            history_rmse=carry.history_rmse.at[m].set(step.stats.rmse_seconds),
            floor_hits=carry.floor_hits.at[m].set(step.floor_hits),
            exposure_prefill=step.exposure_prefill,
            exposure_decode=step.exposure_decode,
            stats=step.stats,
        )

    def keep_going(carry: _Carry) -> jax.Array:
        return (carry.iteration < max_outer_iters) & ~(carry.delta < tol) & carry.finite

    nan = jnp.array(jnp.nan, dtype=dtype)
    history = jnp.full((max_outer_iters,), nan)
    zeros = jnp.zeros_like(duration)
    initial = _Carry(
        iteration=jnp.array(0, dtype=jnp.int32),
        beta=init_beta,
        effective_prefill=context.initial_prefill,
        delta=jnp.array(jnp.inf, dtype=dtype),
        finite=jnp.all(jnp.isfinite(init_beta)),
        history_beta=jnp.full((max_outer_iters + 1, 3), nan).at[0].set(init_beta),
        history_delta=history,
        history_r2=history,
        history_rmse=history,
        floor_hits=jnp.zeros((max_outer_iters,), dtype=jnp.int32),
        exposure_prefill=zeros,
        exposure_decode=zeros,
        stats=FitStats(r2=nan, rmse_seconds=nan, cond_scaled=nan),
    )
    final = jax.lax.while_loop(keep_going, outer_step, initial)

    converged = final.delta < tol
    m = final.iteration
    stop_code = classify_stop(
        final.history_beta,
        m,
        final.finite,
        converged,
        lambda a, b: jnp.linalg.norm(a - b) < tol,
    )
    return IterativeFit(
        beta=final.beta,
        init_beta=init_beta,
        converged=converged,
        n_outer_iters=m,
        stop_code=stop_code,
        history_beta=final.history_beta,
        history_delta=final.history_delta,
        history_r2=final.history_r2,
        history_rmse=final.history_rmse,
        steps=context.steps,
        duration=duration,
        exposure_prefill=final.exposure_prefill,
        exposure_decode=final.exposure_decode,
        stats=final.stats,
        lambda_floor_segments=final.floor_hits,
        n_phases=jnp.sum(arrays.valid),
        effective_prefill=final.effective_prefill,
        history_stop=final.history_delta,
        n_fallbacks=jnp.array(0, dtype=jnp.int32),
    )
