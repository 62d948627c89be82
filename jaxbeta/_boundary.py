"""Host-side boundary: read, validate, order and pad a phase table.

Everything here is NumPy/pandas and runs once per trace before any JAX work.
Every rejection is a ``ValueError`` whose message names the problem and, where
rows are at fault, shows the offending rows (by their index label) or ids.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from jaxbeta._arrays import PhaseArrays

__all__ = [
    "ColumnNames",
    "PreparedTrace",
    "bucket_size",
    "check_chunk_size",
    "load_table",
    "prepare_trace",
]

_MAX_SHOWN = 5
MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class ColumnNames:
    """Names of the input columns (SPEC section 2; all renameable)."""

    request_id: str = "request_id"
    phase_type: str = "phase_type"
    t_start: str = "t_start"
    t_end: str = "t_end"
    prefill_tokens: str = "prefill_tokens"
    decode_tokens: str = "decode_tokens"
    n_steps: str = "N_steps"

    @property
    def required(self) -> tuple[str, ...]:
        return (
            self.request_id,
            self.phase_type,
            self.t_start,
            self.t_end,
            self.prefill_tokens,
            self.decode_tokens,
        )


@dataclasses.dataclass(frozen=True)
class PreparedTrace:
    """A validated trace: padded arrays plus what the host needs to report.

    Attributes:
      arrays: the padded :class:`PhaseArrays` (NumPy leaves, float64 times).
      n_phases: number of real rows ``n`` (the rest is padding).
      index: the input table's index, in input row order.
      origin: seconds subtracted from every timestamp (exactly, for
        non-negative timestamps: see :func:`_exact_origin`).
    """

    arrays: PhaseArrays
    n_phases: int
    index: pd.Index
    origin: float


def bucket_size(n: int, minimum: int = MIN_BUCKET) -> int:
    """Padded size for ``n`` rows: the next power of two, at least ``minimum``.

    Traces whose sizes fall in one bucket share one compiled program; padding
    wastes at most half the rows.
    """
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size


def check_chunk_size(chunk_size: Any) -> float:
    """Returns ``chunk_size`` as a float, or raises ``ValueError`` if not > 0."""
    try:
        if isinstance(chunk_size, (bool, np.bool_)):
            raise TypeError
        value = float(chunk_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"`chunk_size` must be a positive number, got {chunk_size!r}"
        ) from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`chunk_size` must be > 0, got {chunk_size!r}")
    return value


def check_min_duration(min_duration_sec: Any) -> float:
    """Returns ``min_duration_sec`` as a float, or raises if negative/non-finite."""
    try:
        value = float(min_duration_sec)
    except (TypeError, ValueError):
        raise ValueError(
            f"`min_duration_sec` must be a number >= 0, got {min_duration_sec!r}"
        ) from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`min_duration_sec` must be >= 0, got {min_duration_sec!r}")
    return value


def load_table(phases: Any) -> pd.DataFrame:
    """Accepts a DataFrame or a path to a CSV/Parquet phase table."""
    if isinstance(phases, pd.DataFrame):
        return phases
    if isinstance(phases, (str, os.PathLike)):
        path = os.fspath(phases)
        if not os.path.exists(path):
            raise ValueError(f"trace file not found: {path!r}")
        if path.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    raise ValueError(
        "`phases` must be a pandas DataFrame or a path to a CSV or Parquet file, "
        f"got {type(phases).__name__}"
    )


def _show_rows(table: pd.DataFrame, bad: np.ndarray, columns) -> str:
    """Formats up to _MAX_SHOWN offending rows, plus a count of the rest."""
    bad = np.asarray(bad, dtype=bool)
    count = int(bad.sum())
    shown = table.loc[bad, list(columns)].head(_MAX_SHOWN).to_string()
    more = f"\n... and {count - _MAX_SHOWN} more" if count > _MAX_SHOWN else ""
    return f"{count} row(s):\n{shown}{more}"


def _numeric_column(table: pd.DataFrame, name: str, rows: np.ndarray) -> np.ndarray:
    """Column ``name`` as float64; non-numeric values on ``rows`` raise."""
    column = table[name]
    if pd.api.types.is_bool_dtype(column.dtype):
        raise ValueError(f"column {name!r} must be numeric, not boolean")
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        # Wall-clock timestamps: seconds since the Unix epoch.
        epoch = pd.Timestamp(0, tz=getattr(column.dtype, "tz", None))
        return (
            (column - epoch)
            .dt.total_seconds()
            .to_numpy(dtype=np.float64, na_value=np.nan)
        )
    if pd.api.types.is_timedelta64_dtype(column.dtype):
        return column.dt.total_seconds().to_numpy(dtype=np.float64, na_value=np.nan)
    values = pd.to_numeric(column, errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    if column.dtype == object:
        # A True among numbers would otherwise count as 1.
        boolean = column.map(lambda value: isinstance(value, bool | np.bool_))
        values = np.where(boolean.to_numpy(dtype=bool), np.nan, values)
    not_numeric = rows & np.isnan(values) & column.notna().to_numpy()
    if not_numeric.any():
        raise ValueError(
            f"column {name!r} has non-numeric values in "
            + _show_rows(table, not_numeric, [name])
        )
    return values


def _exact_origin(times: np.ndarray) -> float:
    """An origin ``o <= min(times)`` such that ``t - o`` is exact in float64.

    ``o`` is a multiple of the spacing of the largest timestamp, so for
    non-negative timestamps every ``t - o`` is a multiple of ``ulp(t)`` no
    larger than ``t`` and hence representable: shifting loses nothing, and
    ``(t_e - o) - (t_s - o) == t_e - t_s`` bit for bit.
    """
    spacing = float(np.spacing(np.max(np.abs(times))))
    return float(np.floor(np.min(times) / spacing) * spacing)


def prepare_trace(
    phases: Any,
    *,
    columns: ColumnNames = ColumnNames(),
    n_pad: int | None = None,
    dtype=np.float64,
) -> PreparedTrace:
    """Validates a phase table (SPEC section 2) and builds padded arrays.

    Args:
      phases: DataFrame (or CSV/Parquet path), one row per phase instance.
      columns: the column names to read.
      n_pad: padded row count; default ``bucket_size(n)``. Must be >= n.
      dtype: float dtype of the time and token arrays.

    Returns:
      A :class:`PreparedTrace`.

    Raises:
      ValueError: naming the problem and the offending rows or ids.
    """
    table = load_table(phases)
    missing = [c for c in columns.required if c not in table.columns]
    if missing:
        raise ValueError(
            f"missing required column(s) {missing}; the table has {list(table.columns)}"
        )
    n = len(table)
    if n == 0:
        raise ValueError("the phase table is empty")
    everywhere = np.ones(n, dtype=bool)

    # Phase types, case-insensitive: lower-case the distinct values only.
    kind = table[columns.phase_type]
    codes, distinct = pd.factorize(kind, use_na_sentinel=True)
    lowered = np.array(
        [v.lower() if isinstance(v, str) else None for v in distinct], dtype=object
    )
    is_prefill_code = np.append(lowered == "prefill", False)  # code -1: missing
    is_decode_code = np.append(lowered == "decode", False)
    is_prefill = is_prefill_code[codes]
    is_decode = is_decode_code[codes]
    bad_kind = ~(is_prefill | is_decode)
    if bad_kind.any():
        values = sorted({repr(v) for v in kind[bad_kind].unique()})[:10]
        raise ValueError(
            f"column {columns.phase_type!r} must be 'prefill' or 'decode' "
            f"(any case); bad values {', '.join(values)} in "
            + _show_rows(table, bad_kind, [columns.request_id, columns.phase_type])
        )

    ids = table[columns.request_id]
    missing_id = ids.isna().to_numpy()
    if missing_id.any():
        raise ValueError(
            f"column {columns.request_id!r} is missing in "
            + _show_rows(table, missing_id, [columns.request_id, columns.phase_type])
        )

    # Timestamps: numeric, finite, positive duration.
    t_start = _numeric_column(table, columns.t_start, everywhere)
    t_end = _numeric_column(table, columns.t_end, everywhere)
    for name, values in ((columns.t_start, t_start), (columns.t_end, t_end)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"column {name!r} must be finite (no NaN or infinity) in "
                + _show_rows(table, bad, [columns.request_id, name])
            )
    nonpositive = t_end <= t_start
    if nonpositive.any():
        raise ValueError(
            "non-positive duration (t_end <= t_start) in "
            + _show_rows(
                table,
                nonpositive,
                [
                    columns.request_id,
                    columns.phase_type,
                    columns.t_start,
                    columns.t_end,
                ],
            )
        )

    # Token counts: only the row's own kind is read (P on prefill rows,
    # D on decode rows); the other column is ignored, as in the reference.
    tokens = np.zeros(n, dtype=np.float64)
    for name, rows in (
        (columns.prefill_tokens, is_prefill),
        (columns.decode_tokens, is_decode),
    ):
        values = _numeric_column(table, name, rows)
        bad = rows & ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"column {name!r} must be a finite count on {_kind_of(name, columns)}"
                " rows; missing or non-finite in "
                + _show_rows(table, bad, [columns.request_id, name])
            )
        bad = rows & (values < 0)
        if bad.any():
            raise ValueError(
                f"column {name!r} has negative token counts in "
                + _show_rows(table, bad, [columns.request_id, name])
            )
        bad = rows & (values != np.round(values))
        if bad.any():
            raise ValueError(
                f"column {name!r} has fractional token counts in "
                + _show_rows(table, bad, [columns.request_id, name])
            )
        tokens = np.where(rows, values, tokens)

    # Optional authoritative step counts.
    has_n_steps = np.zeros(n, dtype=bool)
    n_steps = np.zeros(n, dtype=np.float64)
    if columns.n_steps in table.columns:
        values = _numeric_column(table, columns.n_steps, everywhere)
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"non-finite step counts in column {columns.n_steps!r}: "
                + _show_rows(table, bad, [columns.request_id, columns.n_steps])
            )
        bad = values < 0
        if bad.any():
            raise ValueError(
                f"negative step counts in column {columns.n_steps!r}: "
                + _show_rows(table, bad, [columns.request_id, columns.n_steps])
            )
        rounded = np.round(values)
        bad = np.abs(values - rounded) > 1e-6
        if bad.any():
            raise ValueError(
                f"step counts in column {columns.n_steps!r} must be integers "
                "(within 1e-6): "
                + _show_rows(table, bad, [columns.request_id, columns.n_steps])
            )
        has_n_steps[:] = True
        n_steps = rounded

    # At most one prefill row per request.
    prefill_ids = ids[is_prefill]
    if not prefill_ids.is_unique:
        repeated = prefill_ids.duplicated(keep=False)
        examples = list(pd.unique(prefill_ids[repeated]))
        shown = ", ".join(repr(x) for x in examples[:10])
        more = f" (and {len(examples) - 10} more)" if len(examples) > 10 else ""
        raise ValueError(
            f"more than one prefill row for {len(examples)} request id(s): "
            f"{shown}{more}"
        )

    # SPEC section 2 also rejects traces with fewer than two distinct
    # timestamps; every row has t_end > t_start by now, so that cannot happen.

    arrays, origin = _build_arrays(
        t_start, t_end, tokens, n_steps, has_n_steps, is_prefill, n_pad, dtype
    )
    return PreparedTrace(arrays=arrays, n_phases=n, index=table.index, origin=origin)


def _kind_of(name: str, columns: ColumnNames) -> str:
    return "prefill" if name == columns.prefill_tokens else "decode"


def _build_arrays(
    t_start, t_end, tokens, n_steps, has_n_steps, is_prefill, n_pad, dtype
) -> tuple[PhaseArrays, float]:
    """Pads the validated columns and computes the grid ordering on the host."""
    n = t_start.shape[0]
    if n_pad is None:
        n_pad = bucket_size(n)
    if n_pad < n:
        raise ValueError(f"`n_pad` ({n_pad}) is smaller than the trace ({n} rows)")
    origin = _exact_origin(np.concatenate([t_start, t_end]))
    start = t_start - origin
    end = t_end - origin
    last = float(end.max())

    def pad(values, fill, out_dtype):
        out = np.full(n_pad, fill, dtype=out_dtype)
        out[:n] = values
        return out

    start_p = pad(start, last, np.float64)
    end_p = pad(end, last, np.float64)
    valid = pad(np.ones(n, dtype=bool), False, bool)
    prefill_p = pad(is_prefill, False, bool)

    # Sorted grid with duplicates: order, ranks, and tie-run bounds.
    times = np.concatenate([start_p, end_p])
    size = times.shape[0]
    order = np.argsort(times).astype(np.int32)
    sorted_times = times[order]
    rank = np.empty(size, dtype=np.int32)
    rank[order] = np.arange(size, dtype=np.int32)
    positions = np.arange(size, dtype=np.int32)
    # first_tie[k] / last_tie[k]: first/last position holding sorted_times[k].
    starts_run = np.ones(size, dtype=bool)
    starts_run[1:] = sorted_times[1:] != sorted_times[:-1]
    first_tie = np.maximum.accumulate(np.where(starts_run, positions, 0))
    ends_run = np.ones(size, dtype=bool)
    ends_run[:-1] = starts_run[1:]
    last_tie = np.minimum.accumulate(np.where(ends_run, positions, size)[::-1])[::-1]
    start_rank = rank[:n_pad]
    end_rank = rank[n_pad:]

    # `end` mode, SPEC section 5: the segment starting at t_re (largest j with
    # g_j <= t_re); a prefill ending at the last grid point gets the last
    # segment of positive length.
    last_positive = int(first_tie[size - 1]) - 1
    end_segment = last_tie[end_rank].astype(np.int32)
    end_segment = np.where(end_segment >= size - 1, last_positive, end_segment)
    # Alternative: the segment ending at t_re, inside the prefill window.
    end_inside = (first_tie[end_rank] - 1).astype(np.int32)
    end_segment = np.where(prefill_p & valid, end_segment, 0).astype(np.int32)
    end_inside = np.where(prefill_p & valid, np.maximum(end_inside, 0), 0)

    arrays = PhaseArrays(
        t_start=start_p.astype(dtype),
        t_end=end_p.astype(dtype),
        tokens=pad(tokens, 0.0, dtype),
        n_steps_given=pad(n_steps, 0.0, dtype),
        has_n_steps=pad(has_n_steps, False, bool),
        is_prefill=prefill_p,
        valid=valid,
        grid_order=order,
        start_rank=start_rank,
        end_rank=end_rank,
        end_segment=end_segment,
        end_inside_segment=end_inside.astype(np.int32),
    )
    return arrays, origin


def columns_from_kwargs(kwargs: Mapping[str, Any]) -> ColumnNames:
    """Builds :class:`ColumnNames` from the public ``*_col`` keywords."""
    return ColumnNames(
        request_id=kwargs["request_id_col"],
        phase_type=kwargs["phase_type_col"],
        t_start=kwargs["t_start_col"],
        t_end=kwargs["t_end_col"],
        prefill_tokens=kwargs["prefill_tokens_col"],
        decode_tokens=kwargs["decode_tokens_col"],
        n_steps=kwargs["n_steps_col"],
    )
