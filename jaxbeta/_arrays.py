"""The fixed-shape array bundle that every kernel consumes.

A trace of ``n`` phases is padded to ``n_pad >= n`` rows (a size bucket) so
that traces of similar size share one compiled program. Padded rows have
``valid == False``, zero tokens and ``t_start == t_end == `` the trace's last
timestamp: they add only zero-length segments at the end of the grid and
are masked out of every sum.

The time grid of SPEC section 4 is represented with duplicates: all
``M = 2 * n_pad`` phase boundaries in sorted order. Segment ``j`` is
``[g_j, g_{j+1})``; segments between tied timestamps have length 0 and drop
out of every integral, so the grid needs no data-dependent ``unique`` and has
a static shape. The sort itself (which boundary comes first) is computed on
the host; all floating-point arithmetic on the timestamps happens in JAX, so
results are differentiable with respect to them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

__all__ = ["PhaseArrays"]


class PhaseArrays(NamedTuple):
    """One trace as padded arrays (a JAX pytree; every leaf has a batch-free
    leading axis, so a stack of bundles vmaps).

    Shapes use ``n`` for the padded phase count and ``M = 2 n`` for the grid.
    """

    t_start: jax.Array  # [n] float, seconds since the trace origin (t_s)
    t_end: jax.Array  # [n] float, seconds since the trace origin (t_e)
    tokens: jax.Array  # [n] float, P_r on prefill rows, D_r on decode rows
    n_steps_given: jax.Array  # [n] float, authoritative N_i where has_n_steps
    has_n_steps: jax.Array  # [n] bool, the row carries an N_steps value
    is_prefill: jax.Array  # [n] bool, prefill row (else decode row)
    valid: jax.Array  # [n] bool, real row (False on padding)
    grid_order: jax.Array  # [M] int32, argsort of concat(t_start, t_end)
    start_rank: jax.Array  # [n] int32, position of t_start in the sorted grid
    end_rank: jax.Array  # [n] int32, position of t_end in the sorted grid
    end_segment: jax.Array  # [n] int32, `end`-mode segment j(r) (prefill rows)
    end_inside_segment: jax.Array  # [n] int32, last segment inside [t_rs, t_re)

    @property
    def n_rows(self) -> int:
        """Padded phase count ``n`` (static)."""
        return self.t_start.shape[-1]
