"""Pure kernels: per-phase quantities, the time grid, pressures and integrals.

SPEC sections 3 and 4. Every function is a pure function of arrays (no
Python loop over rows or segments), jit-able, vmap-able and differentiable
with respect to the float inputs. Shapes: ``n`` padded phases, ``M = 2n``
grid points, ``S = M - 1`` segments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbeta._arrays import PhaseArrays

__all__ = [
    "Grid",
    "build_grid",
    "phase_durations",
    "phase_integral",
    "phase_steps",
    "prefix_integral",
    "prefix_integral_compensated",
    "prefix_sum",
    "prefix_sum_compensated",
    "phase_integral_compensated",
]


class Grid(NamedTuple):
    """The sorted time grid of one trace (SPEC section 4).

    Segment ``j`` is ``[points[j], points[j+1])``; tied timestamps give
    zero-length segments, which drop out of every integral.
    """

    points: jax.Array  # [M] seconds, sorted phase boundaries g_j
    length: jax.Array  # [S] seconds, g_{j+1} - g_j (>= 0)
    n_prefill: jax.Array  # [S] prefill phases active on segment j, n_pf[j]
    n_decode: jax.Array  # [S] decode phases active on segment j, n_dec[j]


# Block length of the blocked prefix sum: within-block sums are one small
# matrix product; see prefix_sum.
_BLOCK = 32
_BLOCK_LONG = 64  # from 2**16 values on
_LONG = 1 << 16


def prefix_sum(values: jax.Array) -> jax.Array:
    """Inclusive cumulative sum along the last axis.

    Floating-point values are summed in blocks: the sums within each block
    of 32 (64 for long inputs) values are one product with a triangular
    matrix of ones, and the block totals are prefix-summed the same way,
    recursively. On XLA's CPU backend this measured 1.7x-3.7x faster than a
    parallel prefix (``lax.associative_scan``) on vmapped batches of
    2,048-value traces and about 10% slower on one 262,144-value trace,
    where its reverse-mode derivative (a product with the transposed matrix)
    is 2.3x faster; ``jnp.cumsum`` was slower than both on long inputs. The
    summation order differs from a sequential sum only in rounding (a few
    units of 1e-16, relative, per sum). Integers (exact counts) use the
    parallel prefix, which needs no matrix product.

    Derivatives (both modes) are blocked prefix sums of the tangent with
    blocks of 32 (:func:`_tangent_prefix_sum`): the same linear map, rounded
    differently, at half the multiply-adds on long inputs.
    """
    size = values.shape[-1]
    if size < 2:
        return values
    if not jnp.issubdtype(values.dtype, jnp.floating):
        return _associative_prefix_sum(values)
    return _float_prefix_sum(values)


def _value_block(size: int) -> int:
    """Block length of :func:`prefix_sum`'s values at ``size`` values."""
    return _BLOCK_LONG if size >= _LONG else _BLOCK


# Block length of the derivative's prefix sums. A pullback of a prefix sum
# of 262,143 values (a product with the transposed block matrix) measured
# 0.40 ms with blocks of 32 against 0.55 ms with 64 (XLA CPU, 2 cores), and
# the pullback of the ptilde stage of the MM map (the inner product of the
# implicit-derivative solves, 100,000 phases) 5.2 ms against 6.0 ms
# (medians); 16 and 8 were no faster there than 32.
_TANGENT_BLOCK = 32


def _blocked_prefix_sum(values: jax.Array, block_of) -> jax.Array:
    """Blocked inclusive prefix sum (see :func:`prefix_sum`) of a floating
    array along its last axis; ``block_of(size)`` is the block length used
    at each level of the recursion."""
    size = values.shape[-1]
    if size < 2:
        return values
    block = block_of(size)
    n_blocks = -(-size // block)
    pad = [(0, 0)] * (values.ndim - 1) + [(0, n_blocks * block - size)]
    blocks = jnp.pad(values, pad).reshape(values.shape[:-1] + (n_blocks, block))
    upper = jnp.triu(jnp.ones((block, block), dtype=values.dtype))
    # HIGHEST: no reduced-precision (e.g. TF32) products on accelerators.
    within = jnp.matmul(blocks, upper, precision=jax.lax.Precision.HIGHEST)
    if n_blocks > 1:
        totals = _blocked_prefix_sum(within[..., -1], block_of)
        before = jnp.concatenate(
            [jnp.zeros_like(totals[..., :1]), totals[..., :-1]], axis=-1
        )
        within = within + before[..., None]
    return within.reshape(values.shape[:-1] + (n_blocks * block,))[..., :size]


def _tangent_prefix_sum(tangent: jax.Array) -> jax.Array:
    """The prefix sum used in derivative rules (blocks of 32, a plain
    function: no custom rule of its own, so it transposes directly)."""
    return _blocked_prefix_sum(tangent, lambda size: _TANGENT_BLOCK)


@jax.custom_jvp
def _float_prefix_sum(values: jax.Array) -> jax.Array:
    """:func:`prefix_sum` of a floating array (at least 2 values)."""
    return _blocked_prefix_sum(values, _value_block)


@_float_prefix_sum.defjvp
def _float_prefix_sum_jvp(primals, tangents):
    (values,), (d_values,) = primals, tangents
    return _float_prefix_sum(values), _tangent_prefix_sum(d_values)


def _associative_prefix_sum(values: jax.Array) -> jax.Array:
    """Inclusive cumulative sum along the last axis by a parallel prefix."""
    size = values.shape[-1]
    # The scan halves its input level by level; an odd length at any level
    # costs extra slicing (2.3x slower at 2**18 - 1 than at 2**18), so the
    # input is zero-padded to a power of two.
    padded_size = 1 << (size - 1).bit_length()
    if padded_size != size:
        pad = [(0, 0)] * (values.ndim - 1) + [(0, padded_size - size)]
        values = jnp.pad(values, pad)
    running = jax.lax.associative_scan(jnp.add, values, axis=values.ndim - 1)
    return running[..., :size]


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's error-free sum: a + b == total + error exactly."""
    total = a + b
    b_virtual = total - a
    error = (a - (total - b_virtual)) + (b - b_virtual)
    return total, error


def add_double_double(left, right):
    """Sum of two double-double numbers (hi, lo), renormalised."""
    high, error = _two_sum(left[0], right[0])
    low = error + left[1] + right[1]
    new_high = high + low
    return new_high, low - (new_high - high)


@jax.custom_jvp
def prefix_sum_compensated(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive cumulative sum along the last axis, with its rounding error.

    Returns ``(high, low)``: ``high + low`` is the running sum to about twice
    the working precision, renormalised so that |low| <= ulp(high) / 2 (pairs
    then compare lexicographically). ``low`` is the running sum of the exact
    rounding residuals of the plain prefix sum's increments (each recovered
    with an error-free TwoSum), so the cost is two prefix sums plus
    element-wise work. Window integrals taken as
    ``(high[e] - high[s]) + (low[e] - low[s])`` keep their digits even after
    the running sum has grown far larger than the window, e.g. past a segment
    at the 1e-12 s step-time floor where lambda = 1e12 steps/s (SPEC
    section 7).

    Derivatives: the running sum is linear, so its tangent is the plain
    prefix sum of the tangent (carried on ``high``; ``low`` has tangent 0).
    Differentiating the error-free transformations themselves would give the
    same numbers at many times the cost.
    """
    high = prefix_sum(values)
    previous = jnp.concatenate([jnp.zeros_like(high[..., :1]), high[..., :-1]], axis=-1)
    # high - previous == increment + increment_error exactly.
    increment, increment_error = _two_sum(high, -previous)
    residual = (values - increment) - increment_error
    low = prefix_sum(residual)
    new_high = high + low
    return new_high, low - (new_high - high)


@prefix_sum_compensated.defjvp
def _prefix_sum_compensated_jvp(primals, tangents):
    (values,), (d_values,) = primals, tangents
    running = prefix_sum_compensated(values)
    d_high = _tangent_prefix_sum(d_values)
    return running, (d_high, jnp.zeros_like(d_high))


def phase_steps(arrays: PhaseArrays, chunk_size: jax.Array) -> jax.Array:
    """Step count N_i of every phase (SPEC section 3), 0 on padding.

    Args:
      arrays: the trace.
      chunk_size: C, prefill tokens per step (scalar).

    Returns:
      [n] steps: the given ``N_steps`` where present, else ``ceil(P / C)`` on
      prefill rows and ``D`` on decode rows.
    """
    derived = jnp.where(
        arrays.is_prefill, jnp.ceil(arrays.tokens / chunk_size), arrays.tokens
    )
    steps = jnp.where(arrays.has_n_steps, arrays.n_steps_given, derived)
    return jnp.where(arrays.valid, steps, 0.0)


def phase_durations(arrays: PhaseArrays, min_duration_sec: jax.Array) -> jax.Array:
    """Duration T_i = max(t_end - t_start, min_duration_sec) (SPEC section 3).

    Returns:
      [n] seconds; 1.0 on padding rows (a safe divisor, masked everywhere).
    """
    raw = arrays.t_end - arrays.t_start
    clamped = jnp.maximum(raw, min_duration_sec)
    return jnp.where(arrays.valid, clamped, 1.0)


def build_grid(arrays: PhaseArrays) -> Grid:
    """Sorted grid, segment lengths and active counts (SPEC section 4).

    A phase is active on ``[t_start, t_end)``; the active count of segment
    ``j`` is the running sum of +1 at every start and -1 at every end up to
    and including grid point ``j``. On a segment of positive length every
    tied event at its left end is included, which is the half-open rule.
    """
    order = arrays.grid_order
    points = jnp.concatenate([arrays.t_start, arrays.t_end])[order]
    prefill = (arrays.valid & arrays.is_prefill).astype(points.dtype)
    decode = (arrays.valid & ~arrays.is_prefill).astype(points.dtype)
    # Counts are small integers: any summation order is exact. (Each signal
    # is summed as its own 1-D array: XLA's CPU cumsum of stacked [k, M]
    # arrays measured several times slower than k separate 1-D passes.)
    n_prefill = prefix_sum(jnp.concatenate([prefill, -prefill])[order])[:-1]
    n_decode = prefix_sum(jnp.concatenate([decode, -decode])[order])[:-1]
    return Grid(
        points=points,
        length=points[1:] - points[:-1],
        n_prefill=n_prefill,
        n_decode=n_decode,
    )


def prefix_integral(grid: Grid, rate: jax.Array) -> jax.Array:
    """Running integral of a piecewise-constant signal at every grid point.

    Args:
      grid: the trace's grid.
      rate: [..., S] value of the signal(s) on each segment (per second);
        leading axes are batched.

    Returns:
      [..., M] ``I[k] = sum_{j < k} rate[j] * length[j]``, with ``I[0] = 0``.
    """
    mass = rate * grid.length
    zero = jnp.zeros(mass.shape[:-1] + (1,), dtype=mass.dtype)
    return jnp.concatenate([zero, prefix_sum(mass)], axis=-1)


def prefix_integral_compensated(
    grid: Grid, rate: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """:func:`prefix_integral` as a double-double pair ``(high, low)``.

    Args:
      grid: the trace's grid.
      rate: [..., S] one or several signals (leading axes are batched).

    Returns:
      ``(high, low)``, each [..., M].
    """
    mass = rate * grid.length
    high, low = prefix_sum_compensated(mass)
    zero = jnp.zeros(mass.shape[:-1] + (1,), dtype=mass.dtype)
    return (
        jnp.concatenate([zero, high], axis=-1),
        jnp.concatenate([zero, low], axis=-1),
    )


def phase_integral_compensated(
    arrays: PhaseArrays, running: tuple[jax.Array, jax.Array]
) -> jax.Array:
    """Window integrals ([..., n]) from a double-double running integral."""
    high, low = running
    end, start = arrays.end_rank, arrays.start_rank
    return (high[..., end] - high[..., start]) + (low[..., end] - low[..., start])


def phase_integral(arrays: PhaseArrays, running: jax.Array) -> jax.Array:
    """Integral over each phase window ``[t_start, t_end)``.

    Phase boundaries are grid points, so the window integral is exactly the
    difference of the running integral at the two boundaries.

    Args:
      arrays: the trace.
      running: [..., M] output of :func:`prefix_integral`.

    Returns:
      [..., n] window integrals (0 on padding rows, whose windows are empty).
    """
    return running[..., arrays.end_rank] - running[..., arrays.start_rank]
