"""Partial-chunk correction signals c(t) (SPEC sections 5 and 8).

The last prefill step of request r processes only rho_r of its C-token
chunk; mu_r = C - rho_r tokens are "missing" from the pressure C * n_pf. Each
mode spreads mu_r over time as a rate in tokens per second on the grid
segments; the mass of request r always integrates to mu_r.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbeta._arrays import PhaseArrays
from jaxbeta._grid import (
    Grid,
    add_double_double,
    prefix_integral_compensated,
    prefix_sum,
)

__all__ = [
    "TRACE_ONLY_MODES",
    "beta_informed_correction",
    "missing_tokens",
    "trace_only_correction",
]

TRACE_ONLY_MODES = ("none", "uniform", "end", "end_inside")
"""Correction modes that depend on the trace alone (SPEC section 5).

``end_inside`` is jaxbeta's alternative to ``end``: the mass goes on the
segment that *ends* at the prefill's end (inside the prefill window) rather
than the one that starts there. It is never a default.
"""

# SPEC section 8: a segment "reaches" the target when acc + mass >= target - eps.
_REACH_SLACK = 1e-15


def missing_tokens(
    arrays: PhaseArrays, steps: jax.Array, chunk_size: jax.Array
) -> jax.Array:
    """Tokens missing from each request's last prefill chunk, mu_r.

    rho_r = clip(P_r - C (N_r - 1), 0, C); mu_r = clip(C - rho_r, 0, C).

    Args:
      arrays: the trace.
      steps: [n] N_i (see ``phase_steps``).
      chunk_size: C, tokens per step.

    Returns:
      [n] tokens; 0 on decode and padding rows.
    """
    last_chunk = jnp.clip(arrays.tokens - chunk_size * (steps - 1.0), 0.0, chunk_size)
    missing = jnp.clip(chunk_size - last_chunk, 0.0, chunk_size)
    return jnp.where(arrays.valid & arrays.is_prefill, missing, 0.0)


def _scatter_to_segments(
    values: jax.Array, segment: jax.Array, n_segments: int
) -> jax.Array:
    return jax.ops.segment_sum(values, segment, num_segments=n_segments)


def _safe_rate(mass: jax.Array, length: jax.Array) -> jax.Array:
    """mass / length on segments of positive length, 0 elsewhere."""
    positive = length > 0
    return jnp.where(positive, mass / jnp.where(positive, length, 1.0), 0.0)


def trace_only_correction(
    grid: Grid, arrays: PhaseArrays, missing: jax.Array, mode: str
) -> jax.Array:
    """Correction rate c[j] of a trace-only mode (SPEC section 5).

    Args:
      grid: the trace's grid.
      arrays: the trace.
      missing: [n] mu_r per prefill row (see :func:`missing_tokens`).
      mode: ``none``, ``uniform``, ``end`` or ``end_inside`` (static).

    Returns:
      [S] tokens per second on each segment.
    """
    n_segments = grid.length.shape[0]
    if mode == "none":
        return jnp.zeros_like(grid.length)
    if mode == "uniform":
        duration = arrays.t_end - arrays.t_start
        rate = jnp.where(missing > 0, missing / jnp.where(missing > 0, duration, 1), 0)
        events = jnp.concatenate([rate, -rate])[arrays.grid_order]
        return prefix_sum(events)[:-1]
    if mode in ("end", "end_inside"):
        segment = arrays.end_segment if mode == "end" else arrays.end_inside_segment
        mass = _scatter_to_segments(missing, segment, n_segments)
        return _safe_rate(mass, grid.length)
    raise ValueError(
        f"unknown correction mode {mode!r}; expected one of {TRACE_ONLY_MODES}"
    )


def _search_double_double(
    high: jax.Array,
    low: jax.Array,
    query: tuple[jax.Array, jax.Array],
    lower: jax.Array,
    upper: jax.Array,
) -> jax.Array:
    """Lower bound in ``[lower, upper]``: the first k with
    ``(high[k], low[k]) >= query``, or ``upper`` when there is none below it.

    ``high + low`` must be non-decreasing and each pair normalised
    (|low| <= ulp(high) / 2), so pairs compare lexicographically. Vectorised
    over the queries; the halving stops once every query's interval is
    closed, i.e. after ceil(log2(widest interval + 1)) steps, which for
    prefill windows is far fewer than a search over the whole grid.
    """
    last = high.shape[0] - 1
    query_high, query_low = query

    def still_open(bounds):
        lower, upper = bounds
        return jnp.any(lower < upper)

    def halve(bounds):
        lower, upper = bounds
        open_ = lower < upper
        middle = (lower + upper) // 2
        at = jnp.minimum(middle, last)
        value_high, value_low = high[at], low[at]
        at_least = (value_high > query_high) | (
            (value_high == query_high) & (value_low >= query_low)
        )
        upper = jnp.where(open_ & at_least, middle, upper)
        lower = jnp.where(open_ & ~at_least, middle + 1, lower)
        return lower, upper

    lower, _ = jax.lax.while_loop(still_open, halve, (lower, upper))
    return lower


def beta_informed_correction(
    grid: Grid,
    arrays: PhaseArrays,
    missing: jax.Array,
    steps: jax.Array,
    step_rate: jax.Array,
    running_steps: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The beta-informed correction for a frozen step rate (SPEC section 8).

    For each prefill request r, the last step's window is ``[t*, t_re)``
    where the step-count integral from t_rs first reaches
    ``L - L / N_r`` (L = integral of lambda over the prefill). mu_r is spread
    over that window in proportion to lambda, so it integrates to mu_r.

    The search for t* is a binary search on the running integral of lambda
    (non-decreasing), done for all requests at once; the full segments of
    every window get the rate ``lambda_j * mu_r / W_r`` through one
    difference array, the partial first segment through a scatter.

    Args:
      grid: the trace's grid.
      arrays: the trace.
      missing: [n] mu_r (0 on non-prefill rows).
      steps: [n] N_r.
      step_rate: [S] lambda_j, steps per second (frozen for this call).
      running_steps: optional precomputed
        ``prefix_integral_compensated(grid, step_rate)`` (shared with the
        MM features, which need the same running integral).

    Returns:
      [S] correction rate c[j], tokens per second.
    """
    n_segments = grid.length.shape[0]
    # Double-double running integral of lambda: steps accumulated before a
    # request's window can exceed its own by 1e12 (floor segments), so
    # every difference below is taken on both parts.
    if running_steps is None:
        running_steps = prefix_integral_compensated(grid, step_rate)
    high, low = running_steps  # [M], steps
    start, end = arrays.start_rank, arrays.end_rank

    # Each running value is gathered once and the copies are reused: the
    # reverse-mode derivative of every separate gather is its own
    # scatter-add over the grid (XLA merges repeated gathers, not their
    # transposes), and a pullback of this function is the inner product of
    # the implicit-derivative solves (_implicit.py). Reusing them took the
    # pullback from 7 scatters to 4 (100,000 phases: 6.4 -> 4.7 ms, on a
    # loaded 2-core machine).
    def at(index):
        return high[index], low[index]

    def steps_between(first, last):
        return (last[0] - first[0]) + (last[1] - first[1])

    at_start, at_end = at(start), at(end)
    window_steps = steps_between(at_start, at_end)  # L
    safe_steps = jnp.where(steps > 0, steps, 1.0)
    target = jnp.clip(window_steps - window_steps / safe_steps, 0.0, window_steps)
    threshold = target - _REACH_SLACK

    # First grid index k in (start, end] whose accumulated steps from t_rs
    # reach the threshold: the walk stops inside segment k - 1. Binary search
    # on the double-double running integral (non-decreasing).
    query = add_double_double(at_start, (threshold, 0.0))
    # Searching (start, end] only: the answer end + 1 means "not reached".
    # Rows that get no correction (decode rows, mu_r = 0) start closed, so
    # that their long windows do not lengthen the search.
    searched = (missing > 0) & (steps > 0)
    first = _search_double_double(
        high, low, query, start + 1, jnp.where(searched, end + 1, start + 1)
    )
    reached = searched & (first <= end)
    segment = jnp.clip(first - 1, 0, n_segments - 1)
    seg_rate = step_rate[segment]
    accumulated = steps_between(at_start, at(segment))
    remaining = jnp.maximum(target - accumulated, 0.0)
    safe_rate = jnp.where(seg_rate > 0, seg_rate, 1.0)
    t_star = jnp.clip(
        grid.points[segment] + remaining / safe_rate, arrays.t_start, arrays.t_end
    )
    t_star = jnp.where(reached, t_star, arrays.t_end)

    # Mass W of lambda over [t*, t_re): the partial segment plus full ones.
    partial = jnp.maximum(grid.points[segment + 1] - t_star, 0.0)
    tail_steps = steps_between(at(segment + 1), at_end) + seg_rate * partial
    active = (
        (missing > 0)
        & (steps > 0)
        & (window_steps > 0)
        & (t_star < arrays.t_end)
        & (tail_steps > 0)
        & reached
    )
    per_step = jnp.where(active, missing / jnp.where(active, tail_steps, 1.0), 0.0)

    # Partial first segment: mu * lambda_j * overlap / W / length_j.
    partial_mass = per_step * seg_rate * partial
    partial_rate = _safe_rate(
        _scatter_to_segments(partial_mass, segment, n_segments), grid.length
    )
    # Full segments segment+1 .. end-1: rate lambda_j * mu / W, via a
    # difference array over segment indices.
    diff = _scatter_to_segments(
        per_step, jnp.where(active, segment + 1, 0), n_segments + 1
    )
    diff = diff - _scatter_to_segments(per_step, end, n_segments + 1)
    coefficient = prefix_sum(diff)[:n_segments]
    # The +mu/W and -mu/W terms of overlapping windows need not cancel
    # exactly in floating point; an exact integer count of open windows
    # keeps that rounding residue off segments no window covers.
    opened = active.astype(jnp.int32)
    open_windows = _scatter_to_segments(
        opened, jnp.where(active, segment + 1, 0), n_segments + 1
    ) - _scatter_to_segments(opened, end, n_segments + 1)
    covered = prefix_sum(open_windows)[:n_segments] > 0
    coefficient = jnp.where(covered, coefficient, 0.0)
    return partial_rate + step_rate * coefficient
