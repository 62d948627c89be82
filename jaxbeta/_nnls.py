"""Three-coefficient non-negative least squares (the only jaxopt user).

    beta = argmin_{beta >= 0} ||X beta - y||^2

depends on the data only through the Gram matrix ``X^T X`` (3x3) and
``X^T y`` (3), so the solver never sees the rows. jaxopt's
``ProjectedGradient`` (accelerated, fixed step 1/3) solves the column-scaled
problem; its support (the coefficients it leaves positive) is then
*polished*: the normal equations restricted to that support are solved
exactly, and the polished point is kept when it satisfies the KKT conditions
(positive on the support, non-negative gradient off it). The polish lands on
the exact optimum (the reference's active-set answer) to rounding, with
exact zeros off the support, which a projected-gradient iterate alone
reaches only asymptotically.

Gradients: the polished point is a linear solve on a fixed support, so
autodiff through it is the implicit-function derivative at the optimum,
with zero sensitivity for coefficients held at 0. When the polish fails (a
rank-deficient design, where the minimiser is not unique) the projected
gradient point is returned with the same implicit derivative on its support,
taken with a pseudo-inverse (see ``_fallback``). jaxopt's own implicit
differentiation is not used because it is reverse-mode only (``jax.jacfwd``
raised on it); the two agree where both apply. Values are unaffected.

jaxopt is in maintenance mode and warns on import; the warning is silenced
here so that it never reaches users, and no other module imports jaxopt.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import jaxopt
    from jaxopt.projection import projection_non_negative

__all__ = ["NNLSSolution", "gram_system", "solve_nnls"]

# Projected-gradient budget: rounds of PG_ROUND_ITERS iterations, at most
# PG_MAX_ROUNDS of them (2048 iterations in all).
PG_ROUND_ITERS = 64
PG_MAX_ROUNDS = 32
PG_TOL = 1e-13


class NNLSSolution(NamedTuple):
    beta: jax.Array  # [3] the minimiser (same units as the design columns)
    polished: jax.Array  # [] bool, the exact support solve was accepted
    pg_iterations: jax.Array  # [] int, projected-gradient iterations used
    cond_scaled: jax.Array  # [] condition number of the column-scaled Gram


def gram_system(
    design: jax.Array, target: jax.Array, weight: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted normal equations of the least-squares fit.

    Args:
      design: [n, 3] rows x_i.
      target: [n] y_i.
      weight: [n] w_i >= 0 (0 masks a row out).

    Returns:
      ``(X^T W X [3, 3], X^T W y [3])``.
    """
    # Column by column: 9 fused multiply-reduce passes measured several times
    # faster on XLA CPU than a [3, n] x [n, 3] matmul over a transposed view.
    columns = [design[:, j] for j in range(design.shape[1])]
    weighted = [weight * column for column in columns]
    gram = jnp.stack(
        [jnp.stack([jnp.sum(w * column) for column in columns]) for w in weighted]
    )
    rhs = jnp.stack([jnp.sum(w * target) for w in weighted])
    return gram, rhs


def _quadratic(z, gram, rhs):
    return 0.5 * z @ (gram @ z) - rhs @ z


def _fallback(z_pg: jax.Array, gram: jax.Array, rhs: jax.Array) -> jax.Array:
    """The projected-gradient point, carrying a minimum-norm implicit derivative.

    Its value is ``z_pg`` exactly. Its derivative is that of the optimality
    conditions on the support of ``z_pg`` (zero off it), solved with a
    pseudo-inverse, which is defined also when the reduced Gram is singular
    (the case where the polish is rejected and the minimiser is not unique).
    """
    z_pg = jax.lax.stop_gradient(z_pg)
    support = z_pg > 0
    both = support[:, None] & support[None, :]
    reduced_inverse = jax.lax.stop_gradient(
        jnp.linalg.pinv(jnp.where(both, gram, 0.0), hermitian=True)
    )
    residual = jnp.where(support, rhs - gram @ z_pg, 0.0)
    # residual - stop_gradient(residual) is exactly 0 but has residual's
    # derivative.
    return z_pg + reduced_inverse @ (residual - jax.lax.stop_gradient(residual))


def solve_nnls(
    gram: jax.Array, rhs: jax.Array, init: jax.Array | None = None
) -> NNLSSolution:
    """Solves ``min_{beta >= 0} 0.5 beta^T G beta - b^T beta``.

    Args:
      gram: [3, 3] ``G = X^T X`` (symmetric positive semi-definite).
      rhs: [3] ``b = X^T y``.
      init: [3] optional warm start (e.g. the previous MM iterate).

    Returns:
      An :class:`NNLSSolution`.
    """
    dtype = gram.dtype
    size = rhs.shape[0]
    # Column scaling: z = d * beta with d_j = ||X[:, j]||; the scaled Gram has
    # a unit diagonal, which makes the step size and the tolerance
    # dimensionless. Columns that are identically 0 keep d_j = 1.
    diag = jnp.diagonal(gram)
    scale = jnp.where(diag > 0, jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    gram_s = gram / (scale[:, None] * scale[None, :])
    # An all-zero column carries no information: give it a unit diagonal so
    # that it neither enters the condition number nor moves (its optimum is
    # 0 either way, since its rhs entry is 0 too).
    nonzero = diag > 0
    gram_s = jnp.where(
        nonzero[:, None] & nonzero[None, :], gram_s, jnp.eye(size, dtype=dtype)
    )
    rhs_s = jnp.where(nonzero, rhs / scale, 0.0)
    eigenvalues = jnp.linalg.eigvalsh(gram_s)
    cond_scaled = eigenvalues[-1] / jnp.maximum(eigenvalues[0], 0.0)

    if init is None:
        z0 = jnp.zeros(size, dtype=dtype)
    else:
        z0 = jnp.maximum(jnp.where(jnp.isfinite(init), init, 0.0), 0.0) * scale

    # The solver and the support search see constants only; every derivative
    # is taken through the polish below.
    gram_c = jax.lax.stop_gradient(gram_s)
    rhs_c = jax.lax.stop_gradient(rhs_s)
    solver = jaxopt.ProjectedGradient(
        fun=_quadratic,
        projection=projection_non_negative,
        # A unit-diagonal PSD matrix has largest eigenvalue <= trace = size,
        # so 1 / size is a safe static step (jaxopt needs a Python float).
        stepsize=1.0 / size,
        maxiter=PG_ROUND_ITERS,
        tol=PG_TOL,
        acceleration=True,
        implicit_diff=False,
    )

    def polish_is_optimal(z_pg):
        return _polish(z_pg > 0, gram_c, rhs_c)[1]

    # Rounds of projected gradient, each followed by a polish of its support;
    # stop at the first support whose polish is optimal (usually the first
    # round: accelerated PG identifies the support long before its iterate
    # meets a 1e-13 tolerance). Each round restarts the momentum.
    def keep_going(state):
        _, optimal, rounds, _ = state
        return ~optimal & (rounds < PG_MAX_ROUNDS)

    def pg_round(state):
        z, _, rounds, iterations = state
        z_new, info = solver.run(z, hyperparams_proj=None, gram=gram_c, rhs=rhs_c)
        return z_new, polish_is_optimal(z_new), rounds + 1, iterations + info.iter_num

    z_pg, accepted, _, iterations = jax.lax.while_loop(
        keep_going,
        pg_round,
        (jax.lax.stop_gradient(z0), jnp.array(False), jnp.array(0), jnp.array(0)),
    )

    # The differentiable polish on the support found: a linear solve on a
    # fixed support, i.e. the implicit derivative of the optimum. When no
    # support polished to the optimum (a rank-deficient design), the PG point
    # is returned with the support-restricted implicit derivative.
    support = z_pg > 0
    z_exact, _ = _polish(support, gram_s, rhs_s, solvable=accepted)
    z = jnp.where(accepted, z_exact, _fallback(z_pg, gram_s, rhs_s))
    return NNLSSolution(
        beta=z / scale,
        polished=accepted,
        pg_iterations=iterations,
        cond_scaled=cond_scaled,
    )


def _polish(
    support: jax.Array,
    gram: jax.Array,
    rhs: jax.Array,
    solvable: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact minimiser on a fixed support and whether it is the optimum.

    Solves the normal equations restricted to ``support`` (zero elsewhere)
    and checks the KKT conditions: positive on the support, gradient
    non-negative off it (with a rounding allowance).

    Args:
      support: [3] bool, coefficients left free.
      gram, rhs: the (scaled) problem.
      solvable: when given and False, a harmless identity system is solved
        instead, so that no NaN reaches gradients through an unused branch.

    Returns:
      ``(z [3], optimal [] bool)``.
    """
    size = rhs.shape[0]
    eye = jnp.eye(size, dtype=gram.dtype)
    support = jax.lax.stop_gradient(support)
    reduced = jnp.where(support[:, None] & support[None, :], gram, eye)
    reduced_rhs = jnp.where(support, rhs, 0.0)
    if solvable is not None:
        reduced = jnp.where(solvable, reduced, eye)
        reduced_rhs = jnp.where(solvable, reduced_rhs, 0.0)
    z = jnp.where(support, jnp.linalg.solve(reduced, reduced_rhs), 0.0)
    gradient = gram @ z - rhs
    slack = 1e3 * jnp.finfo(gram.dtype).eps * (1.0 + jnp.max(jnp.abs(rhs)))
    optimal = (
        jnp.all(jnp.isfinite(z))
        & jnp.all(jnp.where(support, z > 0, True))
        & jnp.all(jnp.where(support, True, gradient >= -slack))
    )
    return z, jax.lax.stop_gradient(optimal)
