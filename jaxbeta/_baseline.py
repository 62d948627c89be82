"""Baseline time-integrated estimator (SPEC section 6).

Exposures over each phase window [t_start, t_end):

    A_pf_i  = lambda_hat_i * integral(p_pf_full) - integral(c)
    A_dec_i = lambda_hat_i * integral(p_dec)

and ``beta = argmin_{beta >= 0} sum_i (beta0 N_i + beta1 A_pf_i + beta2 A_dec_i
- T_i)^2``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbeta._arrays import PhaseArrays
from jaxbeta._correction import missing_tokens, trace_only_correction
from jaxbeta._grid import (
    build_grid,
    phase_durations,
    phase_integral,
    phase_steps,
    prefix_integral,
)
from jaxbeta._nnls import gram_system, solve_nnls
from jaxbeta._robust import auto_huber_scale, check_loss, huber_nnls

__all__ = ["BaselineFit", "FitStats", "baseline_exposures", "fit_baseline_arrays"]


class FitStats(NamedTuple):
    """Goodness of fit of one NNLS solve, over the valid rows."""

    r2: jax.Array  # [] 1 - SS_res / SS_tot (NaN when SS_tot == 0)
    rmse_seconds: jax.Array  # [] sqrt(SS_res / n)
    cond_scaled: jax.Array  # [] condition number of the column-scaled design


class BaselineFit(NamedTuple):
    """Array-level baseline result (a pytree; vmaps over traces).

    Padding rows hold zeros in ``design`` and 1.0 in ``duration``.
    """

    beta: jax.Array  # [3] (s/step, s/token, s/token)
    steps: jax.Array  # [n] N_i, steps
    duration: jax.Array  # [n] T_i, seconds (the regression target)
    exposure_prefill: jax.Array  # [n] A_pf_i, tokens
    exposure_decode: jax.Array  # [n] A_dec_i, tokens
    stats: FitStats
    n_phases: jax.Array  # [] number of valid rows


def fit_stats(
    design: jax.Array,
    target: jax.Array,
    weight: jax.Array,
    beta: jax.Array,
    cond_scaled: jax.Array,
) -> FitStats:
    """r2 and rmse of ``design @ beta`` against ``target`` on weighted rows."""
    count = jnp.sum(weight)
    residual = target - design @ beta
    ss_res = jnp.sum(weight * residual**2)
    mean = jnp.sum(weight * target) / count
    ss_tot = jnp.sum(weight * (target - mean) ** 2)
    r2 = jnp.where(ss_tot > 0, 1.0 - ss_res / jnp.where(ss_tot > 0, ss_tot, 1), jnp.nan)
    return FitStats(
        r2=r2, rmse_seconds=jnp.sqrt(ss_res / count), cond_scaled=cond_scaled
    )


def baseline_exposures(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    correction_mode: str = "end",
    prefill_cap: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-phase design of the baseline fit.

    Args:
      arrays: the padded trace.
      chunk_size: C, prefill tokens per step.
      min_duration_sec: lower clamp on T_i, seconds.
      correction_mode: ``none``, ``uniform``, ``end`` or ``end_inside``.
      prefill_cap: optional [S] cap on the prefill pressure, tokens per step
        (a token budget's ``B - p_dec``; used by the iterative estimator's
        initialisation, see ``jaxbeta._iterative.budget_prefill_cap``).

    Returns:
      ``(N_i, T_i, A_pf_i, A_dec_i)``, each [n] (steps, seconds, tokens,
      tokens); zeros on padding rows except T_i = 1.
    """
    grid = build_grid(arrays)
    steps = phase_steps(arrays, chunk_size)
    duration = phase_durations(arrays, min_duration_sec)
    step_rate_hat = steps / duration  # lambda_hat_i, steps per second

    prefill_pressure = chunk_size * grid.n_prefill  # p_pf_full, tokens/step
    if prefill_cap is not None:
        prefill_pressure = jnp.minimum(prefill_pressure, prefill_cap)
    decode_pressure = grid.n_decode  # p_dec, tokens/step
    missing = missing_tokens(arrays, steps, chunk_size)
    correction = trace_only_correction(grid, arrays, missing, correction_mode)

    prefill_integral, decode_integral, correction_integral = (
        phase_integral(arrays, prefix_integral(grid, signal))
        for signal in (prefill_pressure, decode_pressure, correction)
    )

    valid = arrays.valid
    exposure_prefill = step_rate_hat * prefill_integral - correction_integral
    exposure_decode = step_rate_hat * decode_integral
    return (
        steps,
        duration,
        jnp.where(valid, exposure_prefill, 0.0),
        jnp.where(valid, exposure_decode, 0.0),
    )


@functools.partial(jax.jit, static_argnames=("correction_mode", "loss"))
def fit_baseline_arrays(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    correction_mode: str = "end",
    weight: jax.Array | None = None,
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
) -> BaselineFit:
    """Baseline NNLS fit of one padded trace: pure, jit-ed, vmap-able.

    Args:
      arrays: the padded trace (see ``jaxbeta.prepare_trace``).
      chunk_size: C, prefill tokens per step (may be traced: sweeps vmap it).
      min_duration_sec: lower clamp on T_i, seconds.
      correction_mode: static; ``end`` (default), ``uniform``, ``none`` or
        ``end_inside``.
      weight: optional [n] non-negative row weights in the least-squares
        objective (default 1 on valid rows); used by bootstrap and
        sensitivity.
      loss: static; ``squared`` (default, SPEC section 6) or ``huber`` (see
        ``jaxbeta._robust``).
      huber_scale: Huber delta in seconds; default ``1.345 * 1.4826 *
        median |r_i|`` of the squared-loss fit. Ignored for ``squared``.

    Returns:
      A :class:`BaselineFit`.
    """
    check_loss(loss)
    steps, duration, exposure_prefill, exposure_decode = baseline_exposures(
        arrays, chunk_size, min_duration_sec, correction_mode
    )
    design = jnp.stack([steps, exposure_prefill, exposure_decode], axis=1)
    row_weight = arrays.valid.astype(design.dtype)
    if weight is not None:
        row_weight = row_weight * weight
    gram, rhs = gram_system(design, duration, row_weight)
    solution = solve_nnls(gram, rhs)
    if loss == "huber":
        if huber_scale is None:
            huber_scale = auto_huber_scale(design, duration, row_weight, solution.beta)
        solution = huber_nnls(design, duration, row_weight, huber_scale, solution.beta)
    stats = fit_stats(design, duration, row_weight, solution.beta, solution.cond_scaled)
    return BaselineFit(
        beta=solution.beta,
        steps=steps,
        duration=duration,
        exposure_prefill=exposure_prefill,
        exposure_decode=exposure_decode,
        stats=stats,
        n_phases=jnp.sum(arrays.valid),
    )
