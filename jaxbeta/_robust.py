"""Huber loss for the three-coefficient fits, by iteratively reweighted NNLS.

With ``loss="huber"`` every least-squares fit of SPEC sections 6 and 7 (step
5) is replaced by

    beta = argmin_{beta >= 0} sum_i w_i rho_delta(T_i - x_i . beta),

where ``rho_delta(r) = r^2 / 2`` for ``|r| <= delta`` and
``delta (|r| - delta / 2)`` beyond: residuals larger than ``delta`` seconds
pull on beta with a fixed force instead of one growing with the residual, so
a few corrupted phases cannot drag the fit.

The scale ``delta`` (seconds) is fixed once per fit. Unless the caller gives
one (``huber_scale``), it is ``1.345 * sigma`` with
``sigma = 1.4826 * median_i |r_i|`` over the residuals of the squared-loss fit
of the same rows (the baseline fit; for the iterative estimator, its
initialisation), the median weighted by the row weights. 1.4826 makes sigma
the standard deviation for Gaussian residuals and 1.345 gives 95% of the
squared loss's efficiency on Gaussian noise.

The minimiser is found by iteratively reweighted NNLS: each round solves the
weighted NNLS with weights ``w_i * min(1, delta / |r_i|)`` from the previous
round's residuals (a majorize-minimize step, so the objective never rises),
until the scaled step is below ``IRLS_TOL`` or ``IRLS_MAX_ROUNDS`` rounds.
Derivatives do not follow the rounds: the result carries the implicit
derivative of the Huber optimality conditions on its support (see
:func:`huber_nnls`). The automatic scale is a weighted median: it moves with
the residual it picks (so with the timestamps), but is piecewise constant in
the row weights, and at equal weights over an even number of rows it sits
exactly on one of its jumps. Derivatives with respect to weights therefore
hold the automatic scale fixed; they are exact for a given ``huber_scale``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbeta._nnls import NNLSSolution, gram_system, solve_nnls

__all__ = [
    "LOSSES",
    "auto_huber_scale",
    "check_huber_scale",
    "check_loss",
    "huber_nnls",
    "weighted_median",
]

LOSSES = ("squared", "huber")
HUBER_TUNING = 1.345  # delta / sigma: 95% Gaussian efficiency
MAD_TO_SIGMA = 1.4826  # sigma / median|r| for Gaussian residuals
IRLS_MAX_ROUNDS = 100
IRLS_TOL = 1e-12  # on ||(beta_new - beta) * column norms|| / ||T||, dimensionless
# delta never falls below this fraction of the mean |T_i|: a trace fitted
# exactly (all residuals 0) would otherwise get delta = 0 and weights 0/0.
MIN_SCALE_FRACTION = 1e-12


def check_loss(loss: str) -> str:
    """Raises ``ValueError`` unless ``loss`` is one of :data:`LOSSES`."""
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {loss!r}")
    return loss


def check_huber_scale(huber_scale) -> float | None:
    """Host-side check: ``None`` or a positive, finite number of seconds."""
    if huber_scale is None:
        return None
    try:
        value = float(huber_scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not (0.0 < value < float("inf")):
        raise ValueError(
            f"`huber_scale` must be a positive number of seconds, got {huber_scale!r}"
        )
    return value


def weighted_median(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Lower weighted median: the smallest value whose cumulative weight
    reaches half the total.

    Args:
      values: [n] any real values.
      weight: [n] non-negative weights (0 removes a value).

    Returns:
      [] the median, differentiable with respect to ``values`` (it is one of
      them) and piecewise constant in ``weight``.
    """
    order = jnp.argsort(values)
    cumulative = jnp.cumsum(weight[order])
    half = 0.5 * cumulative[-1]
    position = jnp.searchsorted(cumulative, half, side="left")
    return values[order][jnp.minimum(position, values.shape[0] - 1)]


def auto_huber_scale(
    design: jax.Array, target: jax.Array, weight: jax.Array, beta: jax.Array
) -> jax.Array:
    """The default Huber scale ``delta = 1.345 * 1.4826 * median |r_i|``.

    Args:
      design: [n, 3] rows x_i.
      target: [n] T_i, seconds.
      weight: [n] row weights (0 on padding).
      beta: [3] the squared-loss fit of the same rows.

    Returns:
      [] delta, seconds.
    """
    residual = jnp.abs(target - design @ beta)
    sigma = MAD_TO_SIGMA * weighted_median(residual, weight)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    floor = MIN_SCALE_FRACTION * jnp.sum(weight * jnp.abs(target)) / count
    return jnp.maximum(HUBER_TUNING * sigma, floor)


def _huber_force(residual: jax.Array, delta: jax.Array) -> jax.Array:
    """psi(r) = clip(r, -delta, delta), the derivative of rho_delta."""
    return jnp.clip(residual, -delta, delta)


def huber_nnls(
    design: jax.Array,
    target: jax.Array,
    weight: jax.Array,
    delta: jax.Array,
    init: jax.Array,
) -> NNLSSolution:
    """Huber-loss NNLS by iteratively reweighted NNLS (see the module doc).

    Derivatives: at the returned beta (support ``A = {j: beta_j > 0}``) the
    optimality conditions are ``g_A(beta, data) = 0`` with
    ``g = sum_i w_i psi(r_i) x_i``; differentiating them gives
    ``H_AA dbeta_A = dg_A`` with ``H = sum_i w_i 1{|r_i| < delta} x_i x_i^T``
    (coefficients held at 0 keep derivative 0). The returned beta has exactly
    the value of the last round and this derivative (pseudo-inverse when
    ``H_AA`` is singular); autodiff never enters the rounds.

    Args:
      design: [n, 3] rows x_i.
      target: [n] T_i, seconds.
      weight: [n] row weights w_i >= 0 (0 on padding).
      delta: [] Huber scale, seconds (> 0).
      init: [3] starting point (the squared-loss fit).

    Returns:
      An :class:`NNLSSolution` of the last round, with the Huber beta.
    """
    design_c = jax.lax.stop_gradient(design)
    target_c = jax.lax.stop_gradient(target)
    weight_c = jax.lax.stop_gradient(weight)
    delta_c = jax.lax.stop_gradient(delta)
    column_norm = jnp.sqrt(jnp.sum(weight_c[:, None] * design_c**2, axis=0))
    target_norm = jnp.sqrt(jnp.sum(weight_c * target_c**2))
    size = jnp.where(target_norm > 0, target_norm, 1.0)

    def reweighted_fit(beta):
        residual = target_c - design_c @ beta
        magnitude = jnp.abs(residual)
        ratio = delta_c / jnp.where(magnitude > 0, magnitude, 1.0)
        irls_weight = weight_c * jnp.where(magnitude > delta_c, ratio, 1.0)
        gram, rhs = gram_system(design_c, target_c, irls_weight)
        return solve_nnls(gram, rhs, init=beta)

    def keep_going(carry):
        rounds, _, change, _ = carry
        return (rounds < IRLS_MAX_ROUNDS) & (change > IRLS_TOL)

    def one_round(carry):
        rounds, beta, _, _ = carry
        solution = reweighted_fit(beta)
        change = jnp.linalg.norm((solution.beta - beta) * column_norm) / size
        change = jnp.where(jnp.isfinite(change), change, 0.0)
        return rounds + 1, solution.beta, change, solution

    start = jax.lax.stop_gradient(init)
    first = reweighted_fit(start)
    infinite = jnp.array(jnp.inf, start.dtype)
    carry = (jnp.array(1, jnp.int32), first.beta, infinite, first)
    _, beta, _, solution = jax.lax.while_loop(keep_going, one_round, carry)

    # Implicit derivative of the Huber optimality conditions on the support.
    support = beta > 0
    residual = target - design @ beta
    force = weight * _huber_force(residual, delta)
    inside = (jnp.abs(residual) < delta).astype(design.dtype) * weight
    hessian = (design * inside[:, None]).T @ design
    both = support[:, None] & support[None, :]
    inverse = jnp.linalg.pinv(jnp.where(both, hessian, 0.0), hermitian=True)
    gradient = jnp.where(support, design.T @ force, 0.0)
    step = jax.lax.stop_gradient(inverse) @ (gradient - jax.lax.stop_gradient(gradient))
    return solution._replace(beta=beta + step)
