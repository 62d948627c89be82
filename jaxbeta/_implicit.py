"""Derivatives of the fitted betas with respect to the trace (array level).

The differentiable inputs of a fit are, per phase, ``t_start``, ``t_end``,
the token count (treated as a real number) and the row weight of the
least-squares objective (:class:`FitInputs`). The grid *order* is fixed on
the host, so every derivative here is the derivative at that order (see
"Ties" below).

Baseline
--------
The baseline fit is a closed-form pipeline ending in an NNLS solve whose
derivative is the implicit one on its support (``_nnls``), so plain
autodiff through :func:`jaxbeta.fit_baseline_arrays` is exact, in both modes.

Iterative
---------
Reverse mode cannot pass through the MM ``lax.while_loop``, and
differentiating the iterations would give the derivative of the iterates,
not of the estimator. The estimator is the fixed point ``s* = F(s*, theta)``
of the damped MM map on the state ``s = (beta [3], ptilde [S])`` (ptilde is
part of the state because of the lag in SPEC section 7, step 1). The
implicit function theorem gives

    ds*/dtheta = (I - dF/ds)^{-1} dF/dtheta,

evaluated at the iterate the loop returned. The linear systems are solved
matrix-free by BiCGSTAB on Jacobian-vector (forward) or vector-Jacobian
(reverse) products of ``F``, in a scaled state where beta is relative to its
own size and ptilde is in units of the chunk size; every solve ends with an
explicit residual check and has a cap on operator products. A Krylov method,
not the plain iteration ``v <- g + J^T v``: the spectrum of ``dF/ds`` is
real and negative on the traces examined, and reaches below -1 on traces
where the loop itself ends in a period-2 cycle (large chunks), where the
plain iteration diverges. BiCGSTAB, not GMRES: a Krylov basis carried
through ``lax.while_loop`` was copied at every step on XLA's CPU backend,
which cost more than the products themselves on 100,000-phase traces.

The sensitivity table's reverse pass (:func:`_adjoint_jacobian`) does not
iterate on the whole state: it eliminates the 3 x 3 beta block exactly and
runs BiCGSTAB on the Schur complement in ptilde, which needs fewer products.

The default tolerance (relative residual ``1e-6``) is a cost/accuracy
trade-off, not the limit of what the fit supports: on 100,000-phase traces
the entries it gives are within 0.07-0.19% of the largest entry of their
(input, beta) row compared with a 1e-14 solve at the same iterate, and
within about 5e-5 at ``adjoint_tol=1e-8`` (a few more products per beta).
The fit's own ``tol`` bounds how far the iterate is from the fixed point;
tighten both where the derivatives must be accurate to more digits.

When the loop stopped at the iteration cap or in a cycle, the returned
iterate is not a fixed point and the formula gives the derivative of a
fixed point that the loop did not reach, linearised at a point that is not
one: treat it as a rough indication only. The host functions report this as
``gradient_valid = False`` together with the stop reason.

Ties
----
Real traces are step-aligned: one request's prefill ends at exactly the
timestamp where another's decode ends. The fit is only piecewise smooth in
the timestamps, with kinks where two boundaries cross. At a tie, the
derivative with respect to one boundary is the derivative of the smooth
piece selected by the tie order the host sort chose (``grid_order``): it is
the one-sided derivative for a boundary that sorts first in its tie group
(moving it earlier) or last (moving it later), and for a boundary in the
middle of a group it belongs to no real perturbation. The sum of the
derivatives over all boundaries sharing one timestamp is well defined: it is
the derivative of moving that timestamp as a whole, which keeps every order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

from jaxbeta._arrays import PhaseArrays
from jaxbeta._baseline import fit_baseline_arrays
from jaxbeta._grid import prefix_integral_compensated
from jaxbeta._iterative import (
    IterativeFit,
    MMContext,
    fit_iterative_arrays,
    initial_huber_scale,
    lagged_effective_prefill,
    mm_context,
    mm_design,
    mm_step,
    step_rates,
)
from jaxbeta._nnls import gram_system, solve_nnls
from jaxbeta._robust import huber_nnls

__all__ = [
    "AdjointReport",
    "FitInputs",
    "IterativeSensitivity",
    "MMState",
    "baseline_beta",
    "baseline_sensitivity_arrays",
    "fit_inputs",
    "iterative_beta",
    "iterative_sensitivity_arrays",
    "mm_map",
]

ADJOINT_TOL = 1e-6  # relative residual of each linear solve, scaled norm
ADJOINT_MAX_ITERS = 200  # operator products per solve, restarts included


class FitInputs(NamedTuple):
    """The inputs a fit is differentiated with respect to (a pytree)."""

    t_start: jax.Array  # [n] seconds since the trace origin
    t_end: jax.Array  # [n] seconds since the trace origin
    tokens: jax.Array  # [n] P_r on prefill rows, D_r on decode rows (real)
    weight: jax.Array  # [n] row weight in the least-squares objective


class MMState(NamedTuple):
    """The state of the MM iteration (SPEC section 7)."""

    beta: jax.Array  # [3] beta^(m) (s/step, s/token, s/token)
    effective_prefill: jax.Array  # [S] ptilde^(m), tokens/step


class AdjointReport(NamedTuple):
    """How well the linear systems of the implicit derivative were solved."""

    residual: jax.Array  # [k] ||b - A x|| / ||b|| per system, scaled norm
    operator_products: jax.Array  # [k] int32, products with dF/ds used
    solved: jax.Array  # [k] bool, residual <= the requested tolerance


class IterativeSensitivity(NamedTuple):
    """Result of :func:`iterative_sensitivity_arrays`."""

    fit: IterativeFit  # the fit; its last iterate is the linearisation point
    jacobian: FitInputs  # each leaf [3, n]: d beta_j / d input_i
    adjoint: AdjointReport  # one entry per beta


def fit_inputs(arrays: PhaseArrays, weight: jax.Array | None = None) -> FitInputs:
    """The differentiable inputs of ``arrays`` (weight 1 unless given)."""
    if weight is None:
        weight = jnp.ones_like(arrays.t_start)
    return FitInputs(arrays.t_start, arrays.t_end, arrays.tokens, weight)


def _with_inputs(arrays: PhaseArrays, inputs: FitInputs) -> PhaseArrays:
    return arrays._replace(
        t_start=inputs.t_start, t_end=inputs.t_end, tokens=inputs.tokens
    )


def baseline_beta(
    inputs: FitInputs,
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    correction_mode: str = "end",
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
) -> jax.Array:
    """Baseline betas [3] as a differentiable function of ``inputs``.

    Plain autodiff (``jax.grad``, ``jacrev``, ``jacfwd``) applies; see the
    module docstring for what the derivatives mean at tied timestamps.
    """
    fit = fit_baseline_arrays(
        _with_inputs(arrays, inputs),
        chunk_size,
        min_duration_sec,
        correction_mode=correction_mode,
        weight=inputs.weight,
        loss=loss,
        huber_scale=huber_scale,
    )
    return fit.beta


def _typed(arrays: PhaseArrays, values):
    """Scalars as arrays of the trace's float dtype, so that Python and NumPy
    scalars share one compiled program (weak and strong types differ)."""
    dtype = arrays.t_start.dtype
    return jax.tree.map(lambda value: jnp.asarray(value, dtype=dtype), values)


def baseline_sensitivity_arrays(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    correction_mode: str = "end",
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
):
    """The baseline fit and the Jacobian of its betas at weights 1 (reverse
    mode through the fit).

    Returns:
      ``(fit, jacobian)``: the :class:`jaxbeta.BaselineFit` and a
      :class:`FitInputs` whose leaves are [3, n], d beta_j / d input_i.
    """
    chunk_size, min_duration_sec, huber_scale = _typed(
        arrays, (chunk_size, min_duration_sec, huber_scale)
    )
    return _baseline_jacobian(
        arrays,
        chunk_size,
        min_duration_sec,
        correction_mode=correction_mode,
        loss=loss,
        huber_scale=huber_scale,
    )


@functools.partial(jax.jit, static_argnames=("correction_mode", "loss"))
def _baseline_jacobian(
    arrays, chunk_size, min_duration_sec, correction_mode, loss, huber_scale
):
    """Jitted body of :func:`baseline_sensitivity_arrays` (typed scalars)."""

    def beta_and_fit(inputs):
        fit = fit_baseline_arrays(
            _with_inputs(arrays, inputs),
            chunk_size,
            min_duration_sec,
            correction_mode=correction_mode,
            weight=inputs.weight,
            loss=loss,
            huber_scale=huber_scale,
        )
        return fit.beta, fit

    beta, pullback, fit = jax.vjp(beta_and_fit, fit_inputs(arrays), has_aux=True)
    (jacobian,) = jax.vmap(pullback)(jnp.eye(3, dtype=beta.dtype))
    return fit, jacobian


def mm_map(
    state: MMState,
    inputs: FitInputs,
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    prefill_correction_mode: str = "beta_informed",
    damping_eta: jax.Array = 1.0,
    init_via_baseline_correction: str = "end",
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
) -> MMState:
    """One damped outer MM step ``F(state, inputs)`` (SPEC section 7).

    The same arithmetic as an iteration of :func:`fit_iterative_arrays`; its
    fixed points are the estimator's values. With ``loss="huber"`` and no
    ``huber_scale`` the automatic scale is recomputed from ``inputs``, as the
    fit does once per fit.
    """
    context = mm_context(
        _with_inputs(arrays, inputs),
        chunk_size,
        min_duration_sec,
        prefill_correction_mode,
        inputs.weight,
    )
    huber_delta = None
    if loss == "huber":
        huber_delta = huber_scale
        if huber_delta is None:
            huber_delta = initial_huber_scale(
                context, chunk_size, min_duration_sec, init_via_baseline_correction
            )
    step = mm_step(
        context,
        state.beta,
        state.effective_prefill,
        prefill_correction_mode,
        huber_delta=huber_delta,
    )
    beta = (1.0 - damping_eta) * state.beta + damping_eta * step.fit_beta
    return MMState(beta=beta, effective_prefill=step.effective_prefill)


# ---------------------------------------------------------------------------
# the MM map in stages, for cheap products in the adjoint solves


def _split_context(context: MMContext):
    """The floating-point leaves of ``context`` (what derivatives flow
    through) and a function rebuilding the context from new values of them
    (integer and boolean leaves, e.g. the grid order, are kept as they are)."""
    leaves, treedef = jax.tree.flatten(context)
    is_float = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]
    fixed = [leaf for leaf, flag in zip(leaves, is_float, strict=True) if not flag]

    def rebuild(float_leaves):
        floats, others = iter(float_leaves), iter(fixed)
        merged = [next(floats) if flag else next(others) for flag in is_float]
        return jax.tree.unflatten(treedef, merged)

    return [leaf for leaf, flag in zip(leaves, is_float, strict=True) if flag], rebuild


def _prefill_stage(
    state: MMState, context: MMContext, prefill_correction_mode: str
) -> jax.Array:
    """The ptilde output of :func:`mm_map` (the same calls as ``mm_step``)."""
    full_step_rate, step_rate, _ = step_rates(
        context, state.beta, state.effective_prefill
    )
    running_steps = prefix_integral_compensated(context.grid, step_rate)
    return lagged_effective_prefill(
        context, full_step_rate, step_rate, prefill_correction_mode, running_steps
    )


def _beta_stage(
    state: MMState,
    effective_prefill: jax.Array,
    context: MMContext,
    settings: _Settings,
    static: dict,
) -> jax.Array:
    """The beta output of :func:`mm_map` given its ptilde output
    ``effective_prefill`` [S] (the rest of ``mm_step``, then the damping).
    ``tests/test_sensitivity.py`` checks that the two stages reproduce
    :func:`mm_map` bit for bit."""
    _, step_rate, _ = step_rates(context, state.beta, state.effective_prefill)
    running_steps = prefix_integral_compensated(context.grid, step_rate)
    design = mm_design(context, step_rate, effective_prefill, running_steps)
    gram, rhs = gram_system(design, context.duration, context.row_weight)
    fit_beta = solve_nnls(gram, rhs, init=state.beta).beta
    if static["loss"] == "huber":
        huber_delta = settings.huber_scale
        if huber_delta is None:
            huber_delta = initial_huber_scale(
                context,
                settings.chunk_size,
                settings.min_duration_sec,
                static["init_via_baseline_correction"],
            )
        fit_beta = huber_nnls(
            design, context.duration, context.row_weight, huber_delta, fit_beta
        ).beta
    eta = settings.damping_eta
    return (1.0 - eta) * state.beta + eta * fit_beta


# ---------------------------------------------------------------------------
# Krylov solves on a pytree operator, in a scaled norm


def _bicgstab_cycle(matvec, x, residual, tol_abs, max_products):
    """BiCGSTAB from ``x`` with true residual ``residual`` (flat vectors).

    Runs until the recursively updated residual is below ``tol_abs``, a
    breakdown, or ``max_products`` operator products. Returns ``(x, products
    used)``. Memory is a fixed handful of vectors (a Krylov basis in a loop
    carry was copied at every step on XLA's CPU backend).
    """
    dtype = residual.dtype
    one = jnp.ones((), dtype)
    zero = jnp.zeros_like(residual)
    shadow = residual

    def keep_going(carry):
        _, r, _, _, _, _, _, products, broken = carry
        return (jnp.linalg.norm(r) > tol_abs) & (products < max_products) & ~broken

    def step(carry):
        x, r, p, v, rho, alpha, omega, products, _ = carry
        rho_new = shadow @ r
        beta = (rho_new / rho) * (alpha / omega)
        p = r + beta * (p - omega * v)
        v = matvec(p)
        denominator = shadow @ v
        broken = (denominator == 0) | (rho_new == 0) | ~jnp.isfinite(denominator)
        alpha = rho_new / jnp.where(broken, 1.0, denominator)
        s = r - alpha * v
        half_done = jnp.linalg.norm(s) <= tol_abs
        t = jax.lax.cond(half_done | broken, lambda s: jnp.zeros_like(s), matvec, s)
        tt = t @ t
        omega = jnp.where(tt > 0, (t @ s) / jnp.where(tt > 0, tt, 1.0), 0.0)
        broken = broken | (~half_done & (omega == 0))
        x_new = x + alpha * p + omega * s
        r_new = s - omega * t
        used = jnp.where(half_done | broken, 1, 2)
        x = jnp.where(broken, x, x_new)
        r = jnp.where(broken, r, r_new)
        return x, r, p, v, rho_new, alpha, omega, products + used, broken

    start = (x, residual, zero, zero, one, one, one, jnp.array(0, jnp.int32), False)
    carry = jax.lax.while_loop(keep_going, step, start)
    return carry[0], carry[7]


def solve_linear(
    matvec, rhs, unit, tol, max_products, residual_with=None, reference_norm=None
):
    """Solves ``A x = rhs`` for a linear pytree operator ``A`` (BiCGSTAB).

    The iteration runs on ``x_hat = x / unit`` and measures residuals as
    ``r / unit`` (``unit`` is a pytree like ``x`` of positive scales), so that
    components of very different sizes count alike. Each cycle ends with the
    true residual ``rhs - A x``, which decides convergence; a cycle that
    stops early (breakdown, or rounding in the updated residual) is restarted
    from there.

    Args:
      matvec: the operator, pytree -> pytree of the same structure.
      rhs: the right-hand side (pytree).
      unit: positive scales, a pytree like ``rhs``.
      tol: target ``||(rhs - A x) / unit|| <= tol * ||rhs / unit||``.
      max_products: cap on operator products (restarts and checks included);
        at least one cycle runs, ending with its check.
      residual_with: optional ``x -> (A x, aux)``, used for the true residual
        at the end of each cycle; lets that product also compute something
        else at ``x`` (``aux`` of the last cycle is returned).
      reference_norm: optional norm (in the scaled space) that residuals are
        measured against instead of ``||rhs / unit||``, for a system that is
        a reduction of a larger one whose right-hand side sets the scale.

    Returns:
      ``(x, relative residual [], products used [] int32, aux)``.
    """
    if residual_with is None:
        residual_with = lambda x: (matvec(x), ())  # noqa: E731
    flat_unit, unravel = jax.flatten_util.ravel_pytree(unit)
    flat_rhs = jax.flatten_util.ravel_pytree(rhs)[0] / flat_unit

    def scaled(function, x_hat):
        out, aux = function(unravel(x_hat * flat_unit))
        return jax.flatten_util.ravel_pytree(out)[0] / flat_unit, aux

    def scaled_matvec(x_hat):
        return scaled(lambda x: (matvec(x), ()), x_hat)[0]

    rhs_norm = jnp.linalg.norm(flat_rhs)
    if reference_norm is not None:
        rhs_norm = reference_norm
    tol_abs = tol * rhs_norm

    def keep_going(carry):
        # At least one cycle, so that ``aux`` always comes from a real check
        # (with a ``reference_norm`` the zero start may already pass).
        _, residual, products, _ = carry
        unsolved = jnp.linalg.norm(residual) > tol_abs
        return (products == 0) | (unsolved & (products < max_products))

    def cycle(carry):
        x_hat, residual, products, _ = carry
        # Aim a little below the tolerance so the true residual passes.
        x_hat, used = _bicgstab_cycle(
            scaled_matvec, x_hat, residual, 0.5 * tol_abs, max_products - products
        )
        product, aux = scaled(residual_with, x_hat)
        return x_hat, flat_rhs - product, products + used + 1, aux

    aux_shape = jax.eval_shape(residual_with, rhs)[1]
    aux = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), aux_shape)
    start = (jnp.zeros_like(flat_rhs), flat_rhs, jnp.array(0, jnp.int32), aux)
    x_hat, residual, products, aux = jax.lax.while_loop(keep_going, cycle, start)
    safe_norm = jnp.where(rhs_norm > 0, rhs_norm, 1.0)
    relative = jnp.linalg.norm(residual) / safe_norm
    return unravel(x_hat * flat_unit), relative, products, aux


def state_unit(state: MMState, chunk_size: jax.Array) -> MMState:
    """Typical sizes of the state's components: |beta_j| (the largest |beta|
    where beta_j is 0) and the chunk size for ptilde."""
    beta = jnp.abs(state.beta)
    largest = jnp.max(beta)
    fallback = jnp.where(largest > 0, largest, 1.0)
    beta_unit = jnp.where(beta > 0, beta, fallback)
    prefill_unit = jnp.full_like(state.effective_prefill, chunk_size)
    return MMState(beta=beta_unit, effective_prefill=prefill_unit)


# ---------------------------------------------------------------------------
# the iterative estimator as a differentiable function


class _Settings(NamedTuple):
    chunk_size: jax.Array
    min_duration_sec: jax.Array
    tol: jax.Array
    damping_eta: jax.Array
    huber_scale: jax.Array | None


def _run_fit(arrays, inputs, settings, static):
    """The fit itself, on constants (no derivative flows through the loop)."""
    inputs = jax.lax.stop_gradient(inputs)
    return fit_iterative_arrays(
        _with_inputs(arrays, inputs),
        settings.chunk_size,
        settings.min_duration_sec,
        prefill_correction_mode=static["prefill_correction_mode"],
        max_outer_iters=static["max_outer_iters"],
        tol=settings.tol,
        damping_eta=settings.damping_eta,
        init_via_baseline_correction=static["init_via_baseline_correction"],
        weight=inputs.weight,
        loss=static["loss"],
        huber_scale=settings.huber_scale,
    )


def _map_of(arrays, settings, static):
    return functools.partial(
        mm_map,
        arrays=arrays,
        chunk_size=settings.chunk_size,
        min_duration_sec=settings.min_duration_sec,
        prefill_correction_mode=static["prefill_correction_mode"],
        damping_eta=settings.damping_eta,
        init_via_baseline_correction=static["init_via_baseline_correction"],
        loss=static["loss"],
        huber_scale=settings.huber_scale,
    )


def iterative_beta(
    inputs: FitInputs,
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    prefill_correction_mode: str = "beta_informed",
    max_outer_iters: int = 25,
    tol: jax.Array = 1e-6,
    damping_eta: jax.Array = 1.0,
    init_via_baseline_correction: str = "end",
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
    adjoint_tol: float = ADJOINT_TOL,
    adjoint_max_iters: int = ADJOINT_MAX_ITERS,
) -> jax.Array:
    """Iterative betas [3] as a differentiable function of ``inputs``.

    The value is ``fit_iterative_arrays(...).beta`` with the same settings.
    Its derivative, in forward and reverse mode (``jax.jvp``, ``jax.grad``,
    ``jacfwd``, ``jacrev``), is the implicit derivative of the MM fixed
    point (module docstring), computed by BiCGSTAB to a relative residual of
    ``adjoint_tol`` within ``adjoint_max_iters`` operator products. A linear
    solve that misses its tolerance yields NaN derivatives rather than
    wrong ones. The derivative is meaningful only when the fit converged:
    check ``fit_iterative_arrays(...).stop_code`` (or use
    :func:`iterative_sensitivity_arrays`, which reports it).

    Args:
      inputs: the differentiable inputs (:func:`fit_inputs`).
      arrays: the padded trace supplying everything else (order, flags).
      others: as in :func:`jaxbeta.fit_iterative_arrays`.

    Returns:
      [3] beta (s/step, s/token, s/token).
    """
    settings = _Settings(chunk_size, min_duration_sec, tol, damping_eta, huber_scale)
    settings = jax.lax.stop_gradient(settings)
    static = dict(
        prefill_correction_mode=prefill_correction_mode,
        max_outer_iters=max_outer_iters,
        init_via_baseline_correction=init_via_baseline_correction,
        loss=loss,
    )
    step_map = _map_of(arrays, settings, static)

    def poison_unsolved(solution, relative, tolerance):
        bad = ~(relative <= tolerance)
        return jax.tree.map(lambda leaf: jnp.where(bad, jnp.nan, leaf), solution)

    @jax.custom_jvp
    def fixed_point(inputs):
        fit = _run_fit(arrays, inputs, settings, static)
        return MMState(fit.beta, fit.effective_prefill)

    @fixed_point.defjvp
    def fixed_point_jvp(primals, tangents):
        (inputs,), (d_inputs,) = primals, tangents
        state = fixed_point(inputs)
        _, forcing = jax.jvp(lambda x: step_map(state, x), (inputs,), (d_inputs,))
        _, state_jvp = jax.linearize(lambda s: step_map(s, inputs), state)
        unit = state_unit(state, settings.chunk_size)
        inverse_unit = jax.tree.map(lambda u: 1.0 / u, unit)

        def solve(matvec, rhs):
            x, relative, _, _ = solve_linear(
                matvec, rhs, unit, adjoint_tol, adjoint_max_iters
            )
            return poison_unsolved(x, relative, adjoint_tol)

        def transpose_solve(vecmat, rhs):
            x, relative, _, _ = solve_linear(
                vecmat, rhs, inverse_unit, adjoint_tol, adjoint_max_iters
            )
            return poison_unsolved(x, relative, adjoint_tol)

        tangent = jax.lax.custom_linear_solve(
            lambda u: jax.tree.map(jnp.subtract, u, state_jvp(u)),
            forcing,
            solve=solve,
            transpose_solve=transpose_solve,
        )
        return state, tangent

    return fixed_point(inputs).beta


def iterative_sensitivity_arrays(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array = 0.0,
    prefill_correction_mode: str = "beta_informed",
    max_outer_iters: int = 25,
    tol: jax.Array = 1e-6,
    damping_eta: jax.Array = 1.0,
    init_via_baseline_correction: str = "end",
    loss: str = "squared",
    huber_scale: jax.Array | None = None,
    adjoint_tol: jax.Array = ADJOINT_TOL,
    adjoint_max_iters: int = ADJOINT_MAX_ITERS,
) -> IterativeSensitivity:
    """The iterative fit and the Jacobian of its betas, with solver reports.

    Reverse mode by hand, in one compiled program: the fit
    (:func:`jaxbeta.fit_iterative_arrays`), one linearisation of ``F`` at the
    returned iterate, then for each beta_j the adjoint system
    ``(I - dF/ds)^T v = e_j`` (beta block eliminated, BiCGSTAB on the rest;
    see :func:`_adjoint_jacobian`) and ``dbeta_j/dinputs = v^T dF/dinputs``.
    Equal to ``jax.jacrev(iterative_beta)`` at weights 1, and cheaper.

    Args:
      arrays: the padded trace; its ``t_start``, ``t_end`` and ``tokens``
        are the differentiation point, and weights are 1.
      others: as in :func:`iterative_beta`.

    Returns:
      An :class:`IterativeSensitivity`; ``fit.stop_code`` says whether the
      derivative belongs to a converged fit (0, ``converged``).
    """
    settings = _typed(
        arrays, _Settings(chunk_size, min_duration_sec, tol, damping_eta, huber_scale)
    )
    static = dict(
        prefill_correction_mode=prefill_correction_mode,
        max_outer_iters=max_outer_iters,
        init_via_baseline_correction=init_via_baseline_correction,
        loss=loss,
    )
    return _fit_and_adjoint(
        arrays,
        settings,
        _typed(arrays, adjoint_tol),
        adjoint_max_iters=adjoint_max_iters,
        **static,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "prefill_correction_mode",
        "max_outer_iters",
        "init_via_baseline_correction",
        "loss",
        "adjoint_max_iters",
    ),
)
def _fit_and_adjoint(
    arrays: PhaseArrays,
    settings: _Settings,
    adjoint_tol: jax.Array,
    *,
    adjoint_max_iters: int,
    **static,
) -> IterativeSensitivity:
    """The fit and its adjoint Jacobian as one compiled program.

    One program rather than two calls: the trace is transferred once and XLA
    shares the context (grid, step counts) that the fit and the
    linearisation both compute. 100,000 phases, chunk 64, interleaved runs:
    5-9% less time than the two calls, with identical results.
    """
    fit = _run_fit(arrays, fit_inputs(arrays), settings, static)
    jacobian, report = _adjoint_jacobian(
        arrays,
        MMState(fit.beta, fit.effective_prefill),
        settings,
        adjoint_tol,
        prefill_correction_mode=static["prefill_correction_mode"],
        init_via_baseline_correction=static["init_via_baseline_correction"],
        loss=static["loss"],
        adjoint_max_iters=adjoint_max_iters,
    )
    return IterativeSensitivity(fit=fit, jacobian=jacobian, adjoint=report)


@functools.partial(
    jax.jit,
    static_argnames=(
        "prefill_correction_mode",
        "init_via_baseline_correction",
        "loss",
        "adjoint_max_iters",
    ),
)
def _adjoint_jacobian(
    arrays: PhaseArrays,
    state: MMState,
    settings: _Settings,
    adjoint_tol: jax.Array,
    *,
    prefill_correction_mode: str,
    init_via_baseline_correction: str,
    loss: str,
    adjoint_max_iters: int,
) -> tuple[FitInputs, AdjointReport]:
    """d beta / d inputs at the MM state ``state`` (rows [3], leaves [3, n]).

    ``F`` is linearised once, in three stages: the context (grid, step counts,
    durations: everything the inputs change), the ptilde output
    ``p' = P(beta, p)`` (:func:`_prefill_stage`: step rates and correction)
    and the beta output ``beta' = B(beta, p, p')`` (:func:`_beta_stage`:
    features, Gram system, NNLS). For a state cotangent ``v = (a [3], w [S])``

        v^T dF/ds = (B_b^T a + P_b^T z,  B_p^T a + P_p^T z),  z = w + B_p'^T a,

    with ``B_b = dB/dbeta`` [3, 3], ``B_p = dB/dp``, ``B_p' = dB/dp'``
    [3, S] (the three rows of the beta stage, one pullback of each e_k,
    computed once) and ``P_b``, ``P_p`` the ptilde stage (one pullback of
    ``z`` gives both). The adjoint system ``(I - dF/ds)^T v = e_j`` of
    beta_j then reads, in ``(a, z)``,

        (I - B_b^T) a = e_j + P_b^T z,    z = D^T a + P_p^T z,

    with ``D = B_p + B_p'`` [3, S]. The 3 x 3 block is eliminated exactly and
    BiCGSTAB solves the Schur complement in ``z``,

        z - D^T (I - B_b^T)^{-1} P_b^T z - P_p^T z = D^T (I - B_b^T)^{-1} e_j,

    each product being one pullback of the ptilde stage. The MM loop's slow
    modes live mostly in the beta block, which the elimination takes out of
    the iteration, and the rows need no ptilde pullback at all. On 100,000
    phases (``benchmarks/bench_grad.py``'s trace), interleaved against the
    former BiCGSTAB on the whole state (rows through both stages, fit and
    derivative as two programs), :func:`iterative_sensitivity_arrays` takes
    19%, 16% and 12% less time at chunk 64, 128 and 512 (4-5 products per
    beta instead of 6-7 at chunk 64). The tolerance keeps its meaning: ``a``
    solves its block to rounding, so the Schur residual is the residual of
    the whole system (its ``w`` part), measured against ``||e_j||`` in the
    same scaled norm as before. Accuracy on those traces, against a 1e-14
    solve: at the default ``adjoint_tol = 1e-6`` every entry is within
    0.07-0.19% of the largest entry of its (input, beta) row; at 1e-8,
    within 2e-5 to 6e-5, for 2-8 more products per beta.

    The residual check that ends a solve pulls ``z`` back through the ptilde
    stage and the context; with the beta stage's own context cotangents it
    also yields ``v^T dF/dinputs``.
    """
    static = dict(
        prefill_correction_mode=prefill_correction_mode,
        init_via_baseline_correction=init_via_baseline_correction,
        loss=loss,
    )
    inputs = fit_inputs(arrays)

    def context_floats(inputs):
        context = mm_context(
            _with_inputs(arrays, inputs),
            settings.chunk_size,
            settings.min_duration_sec,
            prefill_correction_mode,
            inputs.weight,
        )
        return _split_context(context)

    floats, context_vjp, rebuild = jax.vjp(context_floats, inputs, has_aux=True)

    def prefill_of(state, floats):
        return _prefill_stage(state, rebuild(floats), prefill_correction_mode)

    def beta_of(state, effective_prefill, floats):
        return _beta_stage(state, effective_prefill, rebuild(floats), settings, static)

    new_prefill, prefill_vjp = jax.vjp(prefill_of, state, floats)
    _, beta_vjp = jax.vjp(beta_of, state, new_prefill, floats)

    def add(*trees):
        return jax.tree.map(lambda *leaves: sum(leaves[1:], leaves[0]), *trees)

    def beta_row(k):  # the beta stage's pullback of e_k
        return beta_vjp(jnp.zeros(3, state.beta.dtype).at[k].set(1.0))

    # leaves [3, ...]: d beta'_k / d state, / d ptilde', / d floats
    state_rows, prefill_rows, floats_rows = jax.lax.map(beta_row, jnp.arange(3))
    beta_block = jnp.eye(3, dtype=state.beta.dtype) - state_rows.beta.T
    # D [3, S]: row k = d beta'_k / d ptilde (lagged) + d beta'_k / d ptilde'
    beta_by_prefill = state_rows.effective_prefill + prefill_rows

    def beta_part(rhs):  # a = (I - B_b^T)^{-1} rhs
        return jnp.linalg.solve(beta_block, rhs)

    def schur(z, pulled):  # the Schur operator at z, from its pullback
        pulled_beta, pulled_prefill = pulled
        return z - beta_part(pulled_beta) @ beta_by_prefill - pulled_prefill

    def schur_matvec(z):
        state_bar, _ = prefill_vjp(z)
        return schur(z, state_bar)

    unit = state_unit(state, settings.chunk_size)

    def one_beta(j):
        e_j = jnp.zeros(3, state.beta.dtype).at[j].set(1.0)

        def schur_and_inputs(z):  # the residual check, with v^T dF/dinputs
            state_bar, floats_bar = prefill_vjp(z)
            a = beta_part(e_j + state_bar.beta)
            floats_total = add(
                jax.tree.map(lambda row: jnp.tensordot(a, row, axes=1), floats_rows),
                floats_bar,
            )
            (inputs_bar,) = context_vjp(floats_total)
            return schur(z, state_bar), inputs_bar

        _, relative, products, inputs_bar = solve_linear(
            schur_matvec,
            beta_part(e_j) @ beta_by_prefill,
            1.0 / unit.effective_prefill,  # cotangents scale inversely
            adjoint_tol,
            adjoint_max_iters,
            residual_with=schur_and_inputs,
            reference_norm=unit.beta[j],  # ||e_j||, scaled like the cotangent
        )
        return inputs_bar, relative, products

    jacobian, relative, products = jax.lax.map(one_beta, jnp.arange(3))
    report = AdjointReport(
        residual=relative,
        operator_products=products,
        solved=relative <= adjoint_tol,
    )
    return jacobian, report
