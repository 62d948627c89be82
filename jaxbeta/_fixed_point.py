"""Fixed-point solvers, stop rules and a consistent prefill update for the MM
estimator: jaxbeta's options on top of SPEC section 7, never its defaults.

The MM loop is a fixed-point iteration ``beta <- T(beta)``: one outer step
(:func:`jaxbeta._iterative.mm_step`) maps an iterate to the NNLS fit of the
features it induces. Three independent choices change how that fixed point
is sought; ``fit_iterative_arrays`` sends every non-default combination here.

``prefill_update`` (what the map's state is):
  ``"lagged"`` (the reference's): ptilde^(m) is computed from the step rate of
  ptilde^(m-1), so the state is (beta, ptilde) and ptilde follows its own
  iteration ``ptilde <- p_pf_full - c * Delta(ptilde)``. Per segment its
  derivative is ``-beta1 * c * Delta``, which exceeds 1 in magnitude where a
  short last chunk ends a short segment (large C, slow beta1): ptilde then
  oscillates, and the outer loop with it.
  ``"consistent"``: for the current beta, ptilde is solved so that the step
  time and the effective prefill agree, ``Delta = beta0 + beta1 ptilde +
  beta2 p_dec`` and ``ptilde = p_pf_full - c Delta``, i.e.::

      ptilde = max((p_pf_full - c (beta0 + beta2 p_dec)) / (1 + beta1 c), 0)

  (every lagged fixed point satisfies this too). For the trace-only
  corrections c is fixed and this is exact; for ``beta_informed`` c depends
  on the step rate, and ``inner_iters`` sweeps of the formula (warm-started
  from the previous outer iteration) approximate the solution. T is then a
  function of beta alone, the fixed-point variable of the solvers below.

``solver`` (how the fixed point of T is sought), in scaled coordinates
``u_j = beta_j / s_j`` where ``s_j = ||y|| / ||X_j||`` over the baseline
initialisation's design (the size of a coefficient that alone would explain
the durations; 1 for an all-zero column):
  ``"picard"`` (the reference's): ``beta <- beta + eta (T(beta) - beta)``.
  ``"anderson"``: Anderson acceleration (type II) with the last
  ``anderson_memory`` differences of accepted iterates and residuals
  ``f = T(u) - u``, projected onto beta >= 0. Safeguard: a proposal whose
  residual norm exceeds that of the last accepted iterate is rejected, the
  memory cleared and the damped step ``u + eta f`` taken from the last
  accepted iterate.
  ``"newton"``: Newton on ``F(u) = T(u) - u``. The Jacobian of T comes from
  forward-mode autodiff (``jax.jacfwd``) of the features with respect to beta,
  chained with the derivative of the least-squares solution on the NNLS
  support (coefficients held at 0 do not move). Safeguard: a Newton point
  whose residual norm exceeds the last accepted iterate's is replaced by
  halving the step, up to ``MAX_BACKTRACKS`` times, then by the damped step
  ``u + eta f``.
  Both take plain steps ``u + eta f`` until every coefficient's plain step
  is below ``accelerate_below`` of its size (far from the fixed point T is
  strongly nonlinear, and extrapolated steps land on the NNLS bounds), and
  halve their eta (down to ``MIN_PLAIN_ETA``) whenever a plain step's
  residual points back against the previous one (cosine below -0.5): damping
  turns the period-2 orbits of plain iteration into convergence.
  Every iteration evaluates T once (once plus three tangents for Newton);
  ``n_outer_iters`` counts evaluations, rejected ones included.

``stop_rule`` (when to stop), on ``d = beta' - beta`` where beta' is the
plain step from the evaluated iterate (``beta + eta (T(beta) - beta)`` for
Picard, ``T(beta)`` for the accelerated solvers):
  ``"absolute"`` (the reference's): ``||d||_2 < tol`` (seconds).
  ``"relative"``: ``max_j |d_j| / max(|beta'_j|, |beta_j|, ZERO_SCALE * s_j)
  < tol`` (dimensionless): every coefficient must be settled to ``tol`` of
  its own size, so a fast engine's beta1 (microseconds per token) is held to
  the same standard as beta0. A coefficient at 0 in both iterates has d_j = 0
  and never blocks; the floor ``ZERO_SCALE * s_j`` (a coefficient that moves
  the fitted durations by a millionth of the data norm) keeps a coefficient
  flickering at rounding level from blocking either.

Returned beta: Picard returns the last iterate (the reference's convention);
the accelerated solvers return ``T`` of the last accepted iterate, i.e. the
NNLS fit whose statistics and features are reported.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbeta._baseline import FitStats, baseline_exposures, fit_stats
from jaxbeta._correction import beta_informed_correction
from jaxbeta._iterative import (
    IterativeFit,
    MMContext,
    classify_stop,
    initial_beta,
    lagged_effective_prefill,
    mm_context,
    mm_design,
    step_rates,
)
from jaxbeta._nnls import gram_system, solve_nnls

__all__ = [
    "MAX_BACKTRACKS",
    "PREFILL_UPDATES",
    "SOLVERS",
    "STOP_RULES",
    "ZERO_SCALE",
    "coefficient_scale",
    "consistent_effective_prefill",
    "fit_fixed_point_arrays",
    "stop_measure",
]

SOLVERS = ("picard", "anderson", "newton")
STOP_RULES = ("absolute", "relative")
PREFILL_UPDATES = ("lagged", "consistent")

ZERO_SCALE = 1e-6
"""Relative stop rule: coefficients below ``ZERO_SCALE * s_j`` count as 0."""
MAX_BACKTRACKS = 3
"""Newton: step halvings before falling back to the damped plain step."""
MIN_PLAIN_ETA = 1.0 / 64
"""Accelerated solvers: the adaptive damping of plain steps stops halving here."""
_ANDERSON_RIDGE = 1e-12  # relative Tikhonov term of the Anderson normal equations


def check_solver_options(
    solver: str,
    stop_rule: str,
    prefill_update: str,
    anderson_memory: int,
    inner_iters: int,
) -> None:
    """Raises ``ValueError`` for an unknown option or a count below 1."""
    for name, value, allowed in (
        ("solver", solver, SOLVERS),
        ("stop_rule", stop_rule, STOP_RULES),
        ("prefill_update", prefill_update, PREFILL_UPDATES),
    ):
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")
    for name, value in (
        ("anderson_memory", anderson_memory),
        ("inner_iters", inner_iters),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")


def consistent_effective_prefill(
    context: MMContext,
    beta: jax.Array,
    warm_start: jax.Array,
    prefill_correction_mode: str,
    inner_iters: int,
) -> jax.Array:
    """ptilde that agrees with its own step time for this beta.

    Args:
      context: from :func:`jaxbeta._iterative.mm_context`.
      beta: [3] (s/step, s/token, s/token).
      warm_start: [S] ptilde to start the ``beta_informed`` sweeps from
        (ignored by the trace-only corrections), tokens per step.
      prefill_correction_mode: static correction mode.
      inner_iters: static number of sweeps for ``beta_informed`` (>= 1).

    Returns:
      [S] ptilde, tokens per step.
    """
    step_time_without_prefill = beta[0] + beta[2] * context.decode_pressure

    def agreeing(correction):
        # Where the token budget binds, the budget's cap is the fixed point:
        # the chunks asked for exceed it at any step time at or below the
        # uncapped solution's.
        uncapped = jnp.maximum(
            (context.prefill_pressure - correction * step_time_without_prefill)
            / (1.0 + beta[1] * correction),
            0.0,
        )
        return jnp.minimum(uncapped, context.prefill_cap)

    if prefill_correction_mode != "beta_informed":
        return agreeing(context.fixed_correction)

    def sweep(_, effective_prefill):
        _, step_rate, _ = step_rates(context, beta, effective_prefill)
        correction = beta_informed_correction(
            context.grid, context.arrays, context.missing, context.steps, step_rate
        )
        return agreeing(correction)

    return jax.lax.fori_loop(0, inner_iters, sweep, warm_start)


def coefficient_scale(
    context: MMContext,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array,
    init_via_baseline_correction: str,
) -> jax.Array:
    """``s_j = ||y|| / ||X_j||`` over the baseline design (1 for a zero column).

    Returns:
      [3] seconds/step, seconds/token, seconds/token.
    """
    _, _, prefill, decode = baseline_exposures(
        context.arrays,
        chunk_size,
        min_duration_sec,
        init_via_baseline_correction,
        prefill_cap=context.prefill_cap,
    )
    design = jnp.stack([context.steps, prefill, decode], axis=1)
    weight = context.row_weight
    column_norm = jnp.sqrt(jnp.sum(weight[:, None] * design**2, axis=0))
    target_norm = jnp.sqrt(jnp.sum(weight * context.duration**2))
    positive = (column_norm > 0) & (target_norm > 0)
    return jnp.where(positive, target_norm / jnp.where(positive, column_norm, 1.0), 1.0)


def stop_measure(
    new: jax.Array, old: jax.Array, stop_rule: str, scale: jax.Array
) -> jax.Array:
    """The stop rule's size of the step ``old -> new`` (see the module doc)."""
    step = new - old
    if stop_rule == "absolute":
        return jnp.linalg.norm(step)
    size = jnp.maximum(jnp.maximum(jnp.abs(new), jnp.abs(old)), ZERO_SCALE * scale)
    return jnp.max(jnp.abs(step) / size)


def _support_least_squares(
    design: jax.Array, target: jax.Array, weight: jax.Array, support: jax.Array
) -> jax.Array:
    """Least squares restricted to ``support`` (0 elsewhere); differentiable.

    Equals the NNLS solution when ``support`` is its set of positive
    coefficients, so its derivative is the NNLS solution's on that support.
    """
    gram, rhs = gram_system(design, target, weight)
    diagonal = jnp.diagonal(gram)
    # Column scaling (constant: the solution does not depend on it).
    scale = jax.lax.stop_gradient(
        jnp.where(diagonal > 0, jnp.sqrt(jnp.where(diagonal > 0, diagonal, 1.0)), 1.0)
    )
    gram_scaled = gram / (scale[:, None] * scale[None, :])
    both = support[:, None] & support[None, :]
    reduced = jnp.where(both, gram_scaled, jnp.eye(3, dtype=gram.dtype))
    scaled = jnp.linalg.solve(reduced, jnp.where(support, rhs / scale, 0.0))
    return jnp.where(support, scaled, 0.0) / scale


class _Evaluation(NamedTuple):
    fit_beta: jax.Array  # [3] T(beta)
    effective_prefill: jax.Array  # [S] ptilde used by the features
    design: jax.Array  # [n, 3]
    stats: FitStats
    floor_hits: jax.Array  # [] int32
    jacobian: jax.Array  # [3, 3] dT/dbeta (zeros unless requested)


def _evaluate(
    context: MMContext,
    beta: jax.Array,
    effective_prefill: jax.Array,
    prefill_correction_mode: str,
    prefill_update: str,
    inner_iters: int,
    with_jacobian: bool,
) -> _Evaluation:
    """One application of T at ``beta`` (and optionally its Jacobian)."""

    def design_at(point):
        if prefill_update == "consistent":
            new_prefill = consistent_effective_prefill(
                context, point, effective_prefill, prefill_correction_mode, inner_iters
            )
            _, step_rate, floor_hits = step_rates(context, point, new_prefill)
        else:
            full_step_rate, step_rate, floor_hits = step_rates(
                context, point, effective_prefill
            )
            new_prefill = lagged_effective_prefill(
                context, full_step_rate, step_rate, prefill_correction_mode
            )
        design = mm_design(context, step_rate, new_prefill)
        return design, (design, new_prefill, floor_hits)

    if with_jacobian:
        design_jacobian, (design, new_prefill, floor_hits) = jax.jacfwd(
            design_at, has_aux=True
        )(beta)
    else:
        design, (_, new_prefill, floor_hits) = design_at(beta)
    duration, weight = context.duration, context.row_weight
    gram, rhs = gram_system(design, duration, weight)
    solution = solve_nnls(gram, rhs, init=beta)
    stats = fit_stats(design, duration, weight, solution.beta, solution.cond_scaled)
    if with_jacobian:
        support = solution.beta > 0

        def solve_on_support(rows):
            return _support_least_squares(rows, duration, weight, support)

        def along(tangent):
            return jax.jvp(solve_on_support, (design,), (tangent,))[1]

        # design_jacobian[i, c, k] = d design[i, c] / d beta_k
        jacobian = jax.vmap(along, in_axes=2, out_axes=1)(design_jacobian)
    else:
        jacobian = jnp.zeros((3, 3), dtype=design.dtype)
    return _Evaluation(
        fit_beta=solution.beta,
        effective_prefill=new_prefill,
        design=design,
        stats=stats,
        floor_hits=floor_hits,
        jacobian=jacobian,
    )


def _anderson_proposal(
    point: jax.Array,
    residual: jax.Array,
    memory_point: jax.Array,
    memory_residual: jax.Array,
    memory_count: jax.Array,
    damping_eta: jax.Array,
) -> jax.Array:
    """Type-II Anderson step from ``point`` (scaled coordinates).

    ``memory_*`` [m, 3] hold differences of consecutive accepted iterates and
    residuals, newest last; only the last ``memory_count`` rows are used.
    """
    size = memory_point.shape[0]
    used = jnp.arange(size) >= size - memory_count
    differences = jnp.where(used[:, None], memory_residual, 0.0)  # [m, 3]
    normal = differences @ differences.T
    ridge = _ANDERSON_RIDGE * jnp.trace(normal) + jnp.finfo(normal.dtype).tiny
    normal = normal + ridge * jnp.eye(size, dtype=normal.dtype)
    weights = jnp.linalg.solve(normal, differences @ residual)
    weights = jnp.where(used, weights, 0.0)
    correction = (memory_point + damping_eta * memory_residual).T @ weights
    return point + damping_eta * residual - correction


class _Carry(NamedTuple):
    iteration: jax.Array  # [] int32, evaluations done
    beta: jax.Array  # [3] the next point to evaluate
    effective_prefill: jax.Array  # [S] state for the next evaluation
    accelerated: jax.Array  # [] bool, the next point is a proposal that may fail
    plain_eta: jax.Array  # [] damping of plain and fallback steps
    anchor_point: jax.Array  # [3] last accepted point (scaled)
    anchor_residual: jax.Array  # [3] its residual T(u) - u (scaled)
    anchor_norm: jax.Array  # [] ||anchor_residual||
    anchor_fit: jax.Array  # [3] T at the anchor (seconds units)
    anchor_prefill: jax.Array  # [S] state after the anchor's evaluation
    has_anchor: jax.Array  # [] bool
    direction: jax.Array  # [3] Newton direction from the anchor (scaled)
    step_fraction: jax.Array  # [] fraction of the direction last tried
    backtracks: jax.Array  # [] int32, halvings since the anchor
    memory_point: jax.Array  # [m, 3] Anderson differences of points
    memory_residual: jax.Array  # [m, 3] Anderson differences of residuals
    memory_count: jax.Array  # [] int32
    measure: jax.Array  # [] last stop measure
    converged: jax.Array  # [] bool
    finite: jax.Array  # [] bool
    n_fallbacks: jax.Array  # [] int32, rejected proposals
    history_beta: jax.Array
    history_delta: jax.Array
    history_stop: jax.Array
    history_r2: jax.Array
    history_rmse: jax.Array
    floor_hits: jax.Array
    exposure_prefill: jax.Array
    exposure_decode: jax.Array
    stats: FitStats


def fit_fixed_point_arrays(
    arrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array,
    prefill_correction_mode: str,
    max_outer_iters: int,
    tol: jax.Array,
    damping_eta: jax.Array,
    init_via_baseline_correction: str,
    weight: jax.Array | None,
    solver: str,
    stop_rule: str,
    prefill_update: str,
    anderson_memory: int,
    inner_iters: int,
    accelerate_below: jax.Array = 0.05,
    token_budget: jax.Array | None = None,
) -> IterativeFit:
    """The MM fit with the module's options: one ``lax.while_loop``.

    Called (and jit-compiled) through
    :func:`jaxbeta._iterative.fit_iterative_arrays`; the arguments are
    documented there. Pure and vmap-able.
    """
    check_solver_options(
        solver, stop_rule, prefill_update, anderson_memory, inner_iters
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
    init_beta = initial_beta(
        context, chunk_size, min_duration_sec, init_via_baseline_correction
    )
    scale = coefficient_scale(
        context, chunk_size, min_duration_sec, init_via_baseline_correction
    )
    initial_eta = jnp.asarray(damping_eta, dtype=dtype)
    accelerated_solver = solver != "picard"

    def body(carry: _Carry) -> _Carry:
        m = carry.iteration
        point = carry.beta
        evaluation = _evaluate(
            context,
            point,
            carry.effective_prefill,
            prefill_correction_mode,
            prefill_update,
            inner_iters,
            with_jacobian=solver == "newton",
        )
        fit = evaluation.fit_beta
        scaled = point / scale
        residual = fit / scale - scaled
        residual_norm = jnp.linalg.norm(residual)
        rejected = carry.accelerated & (residual_norm > carry.anchor_norm)
        accepted = ~rejected
        # Adaptive damping of the plain steps (accelerated solvers only): a
        # plain step whose residual points back against the previous one
        # (an oscillation, e.g. a period-2 orbit) halves eta for all later
        # plain and fallback steps. (The residual norm is no guide here: it
        # can grow while plain iteration converges.)
        alignment = jnp.dot(residual, carry.anchor_residual) / jnp.maximum(
            residual_norm * jnp.linalg.norm(carry.anchor_residual),
            jnp.finfo(dtype).tiny,
        )
        oscillating = ~carry.accelerated & carry.has_anchor & (alignment < -0.5)
        eta = jnp.where(
            oscillating & accelerated_solver,
            jnp.maximum(0.5 * carry.plain_eta, MIN_PLAIN_ETA),
            carry.plain_eta,
        )
        plain_next = fit if accelerated_solver else point + eta * (fit - point)
        measure = stop_measure(plain_next, point, stop_rule, scale)
        converged = accepted & (measure < tol)
        # Accelerate only near the fixed point, where T is nearly linear.
        near = stop_measure(fit, point, "relative", scale) < accelerate_below

        # Anderson memory: differences between consecutive accepted points.
        push = accepted & carry.has_anchor
        memory_point = jnp.where(
            push,
            jnp.roll(carry.memory_point, -1, axis=0)
            .at[-1]
            .set(scaled - carry.anchor_point),
            carry.memory_point,
        )
        memory_residual = jnp.where(
            push,
            jnp.roll(carry.memory_residual, -1, axis=0)
            .at[-1]
            .set(residual - carry.anchor_residual),
            carry.memory_residual,
        )
        memory_count = jnp.where(
            rejected,
            0,
            jnp.where(
                push,
                jnp.minimum(carry.memory_count + 1, anderson_memory),
                carry.memory_count,
            ),
        )

        fallback = carry.anchor_point + eta * carry.anchor_residual
        direction = carry.direction
        step_fraction = carry.step_fraction
        backtracks = carry.backtracks
        if solver == "picard":
            next_scaled = plain_next / scale
            next_accelerated = jnp.array(False)
        elif solver == "anderson":
            proposal = _anderson_proposal(
                scaled, residual, memory_point, memory_residual, memory_count, eta
            )
            plain = scaled + eta * residual
            next_scaled = jnp.where(
                accepted, jnp.where(near, proposal, plain), fallback
            )
            next_accelerated = accepted & near & (memory_count > 0)
        else:
            jacobian = evaluation.jacobian * scale[None, :] / scale[:, None]
            newton = jnp.linalg.solve(jnp.eye(3, dtype=dtype) - jacobian, residual)
            usable = jnp.all(jnp.isfinite(newton)) & near
            newton = jnp.where(usable, newton, 0.0)
            retry = rejected & (carry.backtracks < MAX_BACKTRACKS)
            halved = 0.5 * carry.step_fraction
            next_scaled = jnp.where(
                accepted,
                jnp.where(usable, scaled + newton, scaled + eta * residual),
                jnp.where(
                    retry, carry.anchor_point + halved * carry.direction, fallback
                ),
            )
            next_accelerated = jnp.where(accepted, usable, retry)
            direction = jnp.where(accepted, newton, carry.direction)
            step_fraction = jnp.where(
                accepted, 1.0, jnp.where(retry, halved, carry.step_fraction)
            )
            backtracks = jnp.where(
                accepted, 0, jnp.where(retry, carry.backtracks + 1, carry.backtracks)
            ).astype(jnp.int32)
        next_beta = jnp.where(
            converged, plain_next, jnp.maximum(next_scaled * scale, 0.0)
        )
        next_prefill = jnp.where(
            rejected, carry.anchor_prefill, evaluation.effective_prefill
        )

        def keep(new, old):
            return jnp.where(accepted, new, old)

        return _Carry(
            iteration=m + 1,
            beta=next_beta,
            effective_prefill=next_prefill,
            accelerated=next_accelerated & ~converged,
            plain_eta=eta,
            anchor_point=keep(scaled, carry.anchor_point),
            anchor_residual=keep(residual, carry.anchor_residual),
            anchor_norm=keep(residual_norm, carry.anchor_norm),
            anchor_fit=keep(fit, carry.anchor_fit),
            anchor_prefill=keep(evaluation.effective_prefill, carry.anchor_prefill),
            has_anchor=carry.has_anchor | accepted,
            direction=direction,
            step_fraction=step_fraction,
            backtracks=backtracks,
            memory_point=memory_point,
            memory_residual=memory_residual,
            memory_count=memory_count.astype(jnp.int32),
            measure=jnp.where(accepted, measure, carry.measure),
            converged=converged,
            finite=jnp.all(jnp.isfinite(next_beta)) & jnp.all(jnp.isfinite(fit)),
            n_fallbacks=carry.n_fallbacks + (rejected & ~next_accelerated),
            history_beta=carry.history_beta.at[m + 1].set(next_beta),
            history_delta=carry.history_delta.at[m].set(
                jnp.linalg.norm(plain_next - point)
            ),
            history_stop=carry.history_stop.at[m].set(measure),
            history_r2=carry.history_r2.at[m].set(evaluation.stats.r2),
            history_rmse=carry.history_rmse.at[m].set(evaluation.stats.rmse_seconds),
            floor_hits=carry.floor_hits.at[m].set(evaluation.floor_hits),
            exposure_prefill=keep(evaluation.design[:, 1], carry.exposure_prefill),
            exposure_decode=keep(evaluation.design[:, 2], carry.exposure_decode),
            stats=jax.tree.map(keep, evaluation.stats, carry.stats),
        )

    def keep_going(carry: _Carry) -> jax.Array:
        return (carry.iteration < max_outer_iters) & ~carry.converged & carry.finite

    nan = jnp.array(jnp.nan, dtype=dtype)
    history = jnp.full((max_outer_iters,), nan)
    zeros = jnp.zeros_like(duration)
    zero3 = jnp.zeros(3, dtype=dtype)
    memory = jnp.zeros((anderson_memory, 3), dtype=dtype)
    initial = _Carry(
        iteration=jnp.array(0, dtype=jnp.int32),
        beta=init_beta,
        effective_prefill=context.initial_prefill,
        accelerated=jnp.array(False),
        plain_eta=initial_eta,
        anchor_point=zero3,
        anchor_residual=zero3,
        anchor_norm=jnp.array(jnp.inf, dtype=dtype),
        anchor_fit=init_beta,
        anchor_prefill=context.initial_prefill,
        has_anchor=jnp.array(False),
        direction=zero3,
        step_fraction=jnp.array(1.0, dtype=dtype),
        backtracks=jnp.array(0, dtype=jnp.int32),
        memory_point=memory,
        memory_residual=memory,
        memory_count=jnp.array(0, dtype=jnp.int32),
        measure=jnp.array(jnp.inf, dtype=dtype),
        converged=jnp.array(False),
        finite=jnp.all(jnp.isfinite(init_beta)),
        n_fallbacks=jnp.array(0, dtype=jnp.int32),
        history_beta=jnp.full((max_outer_iters + 1, 3), nan).at[0].set(init_beta),
        history_delta=history,
        history_stop=history,
        history_r2=history,
        history_rmse=history,
        floor_hits=jnp.zeros((max_outer_iters,), dtype=jnp.int32),
        exposure_prefill=zeros,
        exposure_decode=zeros,
        stats=FitStats(r2=nan, rmse_seconds=nan, cond_scaled=nan),
    )
    final = jax.lax.while_loop(keep_going, body, initial)

    m = final.iteration
    beta = final.anchor_fit if accelerated_solver else final.beta
    # A period-2 orbit among the evaluated points, by the stop rule's measure.
    stop_code = classify_stop(
        final.history_beta,
        m,
        final.finite,
        final.converged,
        lambda a, b: stop_measure(a, b, stop_rule, scale) < tol,
    )
    return IterativeFit(
        beta=beta,
        init_beta=init_beta,
        converged=final.converged,
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
        history_stop=final.history_stop,
        n_fallbacks=final.n_fallbacks,
    )
