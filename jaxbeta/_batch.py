"""Fitting many traces, or one trace under many settings, in vmapped batches.

Host side, once per trace: read, validate and pad (``prepare_trace``), which
puts every trace in a size bucket (a power of two of at least 64 rows).
Device side, once per bucket: the padded arrays of the bucket's traces are
stacked along a new leading batch axis and fitted by one jit-compiled
``jax.vmap`` of the single-trace array fit (``fit_baseline_arrays`` or
``fit_iterative_arrays``), split over all devices (see ``_sharding``).

Programs are compiled once per (bucket size, batch length, static settings)
and reused by later calls: the batch length is padded to a power of two (at
least 8) by repeating a real trace whose extra results are discarded, so
fitting 5 or 7 traces of one bucket runs the same program.

Because every trace keeps its own padded arrays and per-trace scalars, each
gets the answer that ``estimate_betas_*`` gives it alone (the vmapped MM
loop keeps iterating a finished trace only as a masked no-op). A trace that
fails validation or cannot be read gets its message in the ``error`` column
and NaN betas; the others are fitted as usual.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import inspect
import itertools
import math
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm import tqdm

from jaxbeta._api import (
    check_jaxbeta_options,
    check_loop_settings,
    check_mode,
    estimate_betas_baseline,
    estimate_betas_iterative,
)
from jaxbeta._arrays import PhaseArrays
from jaxbeta._baseline import fit_baseline_arrays
from jaxbeta._boundary import (
    ColumnNames,
    PreparedTrace,
    check_chunk_size,
    check_min_duration,
    columns_from_kwargs,
    load_table,
    prepare_trace,
)
from jaxbeta._correction import TRACE_ONLY_MODES
from jaxbeta._iterative import (
    CONVERGED,
    INIT_MODES,
    ITERATIVE_MODES,
    STOP_CODES,
    fit_iterative_arrays,
    stop_reason_name,
)
from jaxbeta._precision import precision_context, resolve_dtype
from jaxbeta._robust import check_huber_scale, check_loss
from jaxbeta._sharding import (
    batch_mesh,
    gather_batch,
    padded_batch_size,
    shard_batch,
    shard_over_batch,
)

__all__ = [
    "RESULT_COLUMNS",
    "ChunkSizeChoice",
    "add_fit_many_arguments",
    "best_chunk_size",
    "fit_many",
    "run_fit_many",
    "sweep",
]

ALGOS = ("baseline", "iterative")

RESULT_COLUMNS = (
    "beta0",
    "beta1",
    "beta2",
    "converged",
    "n_outer_iters",
    "stop_reason",
    "r2",
    "rmse_seconds",
    "n_phases",
    "error",
)
"""Columns of :func:`fit_many`'s table (and the result part of :func:`sweep`)."""

DEFAULT_MAX_BATCH = 256
"""Default cap on traces per compiled call (bounds device memory)."""

MIN_BATCH = 8
"""Smallest batch length: calls with 1 to 8 entries share one program, which
costs a few wasted fits but saves compiles (seconds each)."""

TRACE_SUFFIXES = (".csv", ".parquet", ".pq")
"""Files of a directory that :func:`fit_many` reads as traces."""

# Keyword arguments of the single-trace estimators that fit_many takes
# directly rather than through ``**options``.
_PER_TRACE_KEYWORDS = ("phases", "chunk_size", "min_duration_sec")
# estimate_betas_iterative's jaxbeta-only keywords, in check_jaxbeta_options' order.
_JAXBETA_OPTIONS = (
    "loss",
    "huber_scale",
    "solver",
    "stop_rule",
    "prefill_update",
    "anderson_memory",
    "inner_iters",
    "accelerate_below",
)
# Static (compile-time) settings: a list of them in a sweep means one call each.
_STATIC_KEYWORDS = {
    "baseline": ("correction_mode",),
    "iterative": ("prefill_correction_mode", "init_via_baseline_correction"),
}


# ---------------------------------------------------------------------------
# Pure array side: one vmapped program per (static settings, mesh)
# ---------------------------------------------------------------------------


class StaticSettings(NamedTuple):
    """Compile-time settings of a batched fit (hashable; keys the programs).

    The iterative-only fields are None for the baseline.
    """

    algo: str
    correction_mode: str  # baseline correction, or the iterative prefill one
    init_via_baseline_correction: str | None
    max_outer_iters: int | None
    loss: str = "squared"  # "squared" or "huber"
    automatic_huber_scale: bool = True  # huber_scale=None: the fit picks it
    solver: str | None = None
    stop_rule: str | None = None
    prefill_update: str | None = None
    anderson_memory: int | None = None
    inner_iters: int | None = None


class TracedSettings(NamedTuple):
    """Per-entry numeric settings, each ``[]`` per trace (``[B]`` batched)."""

    chunk_size: jax.Array  # C, prefill tokens per step
    min_duration_sec: jax.Array  # lower clamp on T_i, seconds
    tol: jax.Array  # MM stop tolerance (iterative; see ``stop_rule``)
    damping_eta: jax.Array  # MM damping in (0, 1] (iterative)
    huber_scale: jax.Array  # Huber delta, seconds (unused when automatic)
    accelerate_below: jax.Array  # anderson/newton switch-over (iterative)


class FitSummary(NamedTuple):
    """What the host keeps of one array fit (a pytree; ``[B, ...]`` batched)."""

    beta: jax.Array  # [3] (s/step, s/token, s/token)
    converged: jax.Array  # [] bool
    n_outer_iters: jax.Array  # [] int32 (0 for the baseline)
    stop_code: jax.Array  # [] int32, index into STOP_CODES
    r2: jax.Array  # [] of the (last) NNLS fit
    rmse_seconds: jax.Array  # [] of the (last) NNLS fit, seconds
    n_phases: jax.Array  # [] int32, real rows
    checks_pass: jax.Array  # [] bool, the single-trace API would not raise


# Number of times each static setting's per-trace fit has been traced; a
# jit cache hit does not trace, so tests read this to detect recompiles.
_TRACE_COUNTS: collections.Counter = collections.Counter()


def _all_finite(*values: jax.Array) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))


def fit_summary(
    arrays: PhaseArrays, settings: TracedSettings, static: StaticSettings
) -> FitSummary:
    """Fits one padded trace and keeps the summary (pure; vmapped per bucket).

    ``checks_pass`` mirrors the host checks that ``estimate_betas_*`` run on
    the fit (finite N_i, T_i, lambda_hat_i; for the baseline also finite
    exposures and betas, for the iterative fit a finite initialisation); the
    host re-runs the single-trace estimator for the rare entry where it is
    False, to report its exact message.

    Args:
      arrays: one padded trace.
      settings: its numeric settings (scalars).
      static: compile-time settings.

    Returns:
      A :class:`FitSummary` (scalars and a [3] beta).
    """
    _TRACE_COUNTS[static] += 1
    valid = arrays.valid
    huber_scale = None if static.automatic_huber_scale else settings.huber_scale
    if static.algo == "baseline":
        fit = fit_baseline_arrays(
            arrays,
            settings.chunk_size,
            settings.min_duration_sec,
            correction_mode=static.correction_mode,
            loss=static.loss,
            huber_scale=huber_scale,
        )
        converged = jnp.array(True)
        n_outer_iters = jnp.array(0, dtype=jnp.int32)
        stop_code = jnp.array(CONVERGED, dtype=jnp.int32)
        extra_checks = (
            jnp.where(valid, fit.exposure_prefill, 0.0),
            jnp.where(valid, fit.exposure_decode, 0.0),
            fit.beta,
        )
    else:
        fit = fit_iterative_arrays(
            arrays,
            settings.chunk_size,
            settings.min_duration_sec,
            prefill_correction_mode=static.correction_mode,
            max_outer_iters=static.max_outer_iters,
            tol=settings.tol,
            damping_eta=settings.damping_eta,
            init_via_baseline_correction=static.init_via_baseline_correction,
            loss=static.loss,
            huber_scale=huber_scale,
            solver=static.solver,
            stop_rule=static.stop_rule,
            prefill_update=static.prefill_update,
            anderson_memory=static.anderson_memory,
            inner_iters=static.inner_iters,
            accelerate_below=settings.accelerate_below,
        )
        converged = fit.converged
        n_outer_iters = fit.n_outer_iters.astype(jnp.int32)
        stop_code = fit.stop_code.astype(jnp.int32)
        # The single-trace estimator raises on a non-finite initialisation.
        extra_checks = (fit.init_beta,)
    steps = jnp.where(valid, fit.steps, 0.0)
    duration = jnp.where(valid, fit.duration, 1.0)
    checks_pass = _all_finite(steps, duration, steps / duration, *extra_checks)
    return FitSummary(
        beta=fit.beta,
        converged=converged,
        n_outer_iters=n_outer_iters,
        stop_code=stop_code,
        r2=fit.stats.r2,
        rmse_seconds=fit.stats.rmse_seconds,
        n_phases=jnp.sum(valid, dtype=jnp.int32),
        checks_pass=checks_pass,
    )


@functools.cache
def batched_fit_program(static: StaticSettings, mesh: jax.sharding.Mesh) -> Callable:
    """The jit-compiled, vmapped, device-sharded fit for ``static`` settings.

    Defined once per (settings, mesh) for the whole process, so its compiled
    executables (one per bucket size, batch length and dtype) are reused by
    every later call.

    Returns:
      ``program(arrays, settings) -> FitSummary`` on ``[B, ...]`` inputs,
      ``B`` a multiple of ``mesh.size``.
    """
    per_entry = functools.partial(fit_summary, static=static)
    return jax.jit(shard_over_batch(jax.vmap(per_entry), mesh))


# ---------------------------------------------------------------------------
# Host side: options
# ---------------------------------------------------------------------------


def _estimator(algo: str) -> Callable:
    return estimate_betas_baseline if algo == "baseline" else estimate_betas_iterative


def _check_algo(algo: Any) -> str:
    return check_mode("algo", algo, ALGOS)


@functools.cache
def _option_defaults(algo: str) -> dict[str, Any]:
    """Keyword defaults of ``estimate_betas_<algo>`` other than the per-trace ones."""
    parameters = inspect.signature(_estimator(algo)).parameters
    return {
        name: p.default
        for name, p in parameters.items()
        if name not in _PER_TRACE_KEYWORDS
    }


def _merge_options(algo: str, options: Mapping[str, Any], caller: str) -> dict:
    """Defaults of the single-trace estimator updated with ``options``.

    Raises:
      TypeError: for a keyword the estimator does not take.
    """
    defaults = _option_defaults(algo)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {unknown} for "
            f"algo={algo!r}; allowed: {sorted(defaults)}"
        )
    if options.get("max_num_batched_tokens") is not None:
        # Not threaded into the batched program yet: refuse it rather than
        # fit as if the engine had no token budget.
        raise ValueError(
            f"{caller}() does not take `max_num_batched_tokens` yet; fit traces "
            "with a token budget one at a time (jaxbeta.fit or "
            "estimate_betas_iterative)"
        )
    return {**defaults, **options}


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Validated settings shared by the entries of one static group."""

    static: StaticSettings
    columns: ColumnNames
    dtype: np.dtype
    tol: float
    damping_eta: float
    huber_scale: float  # NaN when automatic
    accelerate_below: float
    estimator_kwargs: dict[str, Any]  # validated keywords of estimate_betas_*


def _validated_settings(algo: str, merged: Mapping[str, Any]) -> _Settings:
    """Checks the estimator keywords like ``estimate_betas_*`` do."""
    dtype = resolve_dtype(merged["dtype"])
    columns = columns_from_kwargs(merged)
    kwargs = dict(merged)
    accelerate = 1.0  # unused by the baseline
    if algo == "baseline":
        mode = check_mode(
            "correction_mode", merged["correction_mode"], TRACE_ONLY_MODES
        )
        check_loss(merged["loss"])
        huber = check_huber_scale(merged["huber_scale"])
        static = StaticSettings(
            "baseline",
            mode,
            None,
            None,
            loss=merged["loss"],
            automatic_huber_scale=huber is None,
        )
        tol, eta = 1.0, 1.0  # unused by the baseline
    else:
        mode = check_mode(
            "prefill_correction_mode",
            merged["prefill_correction_mode"],
            ITERATIVE_MODES,
        )
        init_mode = check_mode(
            "init_via_baseline_correction",
            merged["init_via_baseline_correction"],
            INIT_MODES,
        )
        iters, tol, eta = check_loop_settings(
            merged["max_outer_iters"], merged["tol"], merged["damping_eta"]
        )
        huber, accelerate = check_jaxbeta_options(
            *(merged[name] for name in _JAXBETA_OPTIONS)
        )
        static = StaticSettings(
            "iterative",
            mode,
            init_mode,
            iters,
            loss=merged["loss"],
            automatic_huber_scale=huber is None,
            solver=merged["solver"],
            stop_rule=merged["stop_rule"],
            prefill_update=merged["prefill_update"],
            anderson_memory=int(merged["anderson_memory"]),
            inner_iters=int(merged["inner_iters"]),
        )
        kwargs.update(max_outer_iters=iters, tol=tol, damping_eta=eta)
    return _Settings(
        static=static,
        columns=columns,
        dtype=dtype,
        tol=tol,
        damping_eta=eta,
        huber_scale=math.nan if huber is None else huber,
        accelerate_below=accelerate,
        estimator_kwargs=kwargs,
    )


def _check_max_batch(max_batch: Any) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)):
        raise ValueError(f"`max_batch` must be a positive integer, got {max_batch!r}")
    if max_batch < 1:
        raise ValueError(f"`max_batch` must be >= 1, got {max_batch!r}")
    return int(max_batch)


# ---------------------------------------------------------------------------
# Host side: inputs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    """One row of the output: a trace (or a sweep setting) and its fate."""

    name: Hashable
    table: pd.DataFrame | None = None
    settings: _Settings | None = None
    chunk_size: float = math.nan
    min_duration_sec: float = math.nan
    prepared: PreparedTrace | None = None
    summary: dict[str, Any] | None = None
    error: str = ""


def _describe_error(error: Exception) -> str:
    """The message of a validation error; other errors also name their type."""
    if type(error) is ValueError:
        return str(error)
    return f"{type(error).__name__}: {error}"


def _read_file(path: Path) -> pd.DataFrame:
    try:
        return load_table(str(path))
    except Exception as error:  # any unreadable file is reported, not raised
        raise ValueError(f"could not read {path}: {_describe_error(error)}") from error


def _directory_sources(directory: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Trace files of ``directory`` (sorted) named by stem, and ignored names.

    Two trace files with one stem (``a.csv``, ``a.parquet``) are named by
    their full file names instead.
    """
    files, ignored = [], []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() in TRACE_SUFFIXES:
            files.append(path)
        else:
            ignored.append(path.name)
    if not files:
        raise ValueError(
            f"no trace files ({', '.join(TRACE_SUFFIXES)}) in directory {directory}"
        )
    stems = collections.Counter(path.stem for path in files)
    named = [
        (path.stem if stems[path.stem] == 1 else path.name, path) for path in files
    ]
    return named, ignored


def _split_long_table(table: pd.DataFrame, trace_col: str) -> list[tuple[Any, Any]]:
    """(trace id, sub-table) pairs of a long table, in order of first appearance."""
    if trace_col not in table.columns:
        raise ValueError(
            f"the table has no trace-id column {trace_col!r} (set `trace_col`); "
            f"its columns are {list(table.columns)}"
        )
    ids = table[trace_col]
    missing = ids.isna().to_numpy()
    if missing.any():
        rows = list(table.index[np.flatnonzero(missing)[:5]])
        raise ValueError(
            f"column {trace_col!r} is missing in {int(missing.sum())} row(s), "
            f"e.g. rows {rows}: every row must name its trace"
        )
    return list(table.groupby(trace_col, sort=False))


def _collect_sources(traces: Any, trace_col: str) -> tuple[list[tuple[Any, Any]], list]:
    """Normalises the accepted input forms to (name, DataFrame-or-path) pairs.

    Returns:
      The pairs in output order, and the names of ignored directory entries.
    """
    if isinstance(traces, pd.DataFrame):
        return _split_long_table(traces, trace_col), []
    if isinstance(traces, Mapping):
        return list(traces.items()), []
    if isinstance(traces, (str, os.PathLike)):
        path = Path(traces)
        if path.is_dir():
            return _directory_sources(path)
        if not path.exists():
            raise ValueError(f"no such file or directory: {path}")
        return _split_long_table(_read_file(path), trace_col), []
    raise ValueError(
        "`traces` must be a mapping name -> DataFrame or path, a long DataFrame "
        f"with a {trace_col!r} column, or a directory path; got "
        f"{type(traces).__name__}"
    )


def _per_trace_value(value: Any, name: Hashable, what: str) -> Any:
    """``value[name]`` for a mapping (ValueError if absent), else ``value``."""
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(f"`{what}` is a mapping without an entry for {name!r}")
        return value[name]
    return value


def _prepare_entry(entry: _Entry, source: Any) -> None:
    """Reads and validates one trace; records the error instead of raising."""
    try:
        table = _read_file(Path(source)) if _is_path(source) else load_table(source)
        entry.table = table
        entry.prepared = prepare_trace(
            table, columns=entry.settings.columns, dtype=entry.settings.dtype
        )
    except (ValueError, TypeError, KeyError) as error:
        entry.error = _describe_error(error)


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


# ---------------------------------------------------------------------------
# Host side: running the batches
# ---------------------------------------------------------------------------


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def _batches(
    entries: Sequence[_Entry], max_batch: int
) -> Iterable[tuple[StaticSettings, np.dtype, list[_Entry]]]:
    """Prepared entries grouped by (static settings, dtype, padded size).

    Each group (smallest padded size first) is cut into runs of at most
    ``max_batch`` entries, rounded down to a power of two.
    """
    groups: dict[tuple, list[_Entry]] = collections.defaultdict(list)
    for entry in entries:
        if entry.prepared is not None:
            settings = entry.settings
            key = (entry.prepared.arrays.n_rows, settings.static, settings.dtype.name)
            groups[key].append(entry)
    limit = 1 << (max_batch.bit_length() - 1)
    for key in sorted(groups, key=lambda k: (k[0], repr(k[1]), k[2])):
        _, static, dtype_name = key
        members = groups[key]
        for first in range(0, len(members), limit):
            yield static, np.dtype(dtype_name), members[first : first + limit]


def _dispatch(
    static: StaticSettings, dtype: np.dtype, batch: list[_Entry], mesh
) -> FitSummary:
    """Pads ``batch`` to the program's batch length and starts its fit.

    The padding repeats the first entry (so it adds no MM iterations to the
    batch's loop); its extra results are never read.
    Returns the (asynchronous) device result.
    """
    size = padded_batch_size(len(batch), mesh.devices.size, minimum=MIN_BATCH)
    filled = batch + [batch[0]] * (size - len(batch))
    arrays = _stack([entry.prepared.arrays for entry in filled])
    settings = TracedSettings(
        chunk_size=np.array([e.chunk_size for e in filled], dtype=dtype),
        min_duration_sec=np.array([e.min_duration_sec for e in filled], dtype=dtype),
        tol=np.array([e.settings.tol for e in filled], dtype=dtype),
        damping_eta=np.array([e.settings.damping_eta for e in filled], dtype=dtype),
        huber_scale=np.array([e.settings.huber_scale for e in filled], dtype=dtype),
        accelerate_below=np.array(
            [e.settings.accelerate_below for e in filled], dtype=dtype
        ),
    )
    program = batched_fit_program(static, mesh)
    with precision_context(dtype):
        return program(shard_batch(arrays, mesh), shard_batch(settings, mesh))


def _collect(batch: list[_Entry], dtype: np.dtype, out: FitSummary) -> None:
    """Reads a finished batch back and stores each entry's summary."""
    with precision_context(dtype):
        host = gather_batch(out)._asdict()
    for index, entry in enumerate(batch):
        entry.summary = {name: values[index] for name, values in host.items()}


def _run_entries(
    entries: Sequence[_Entry], *, max_batch: int, progress: bool, desc: str
) -> None:
    """Fits every prepared entry, one compiled call per batch (see _batches).

    Fills ``entry.summary``. Batch k+1 is stacked and dispatched before
    batch k is read back, so the host works while the devices run.
    """
    mesh = batch_mesh()
    total = sum(entry.prepared is not None for entry in entries)
    with tqdm(
        total=total, desc=desc, unit="trace", disable=not progress, file=sys.stderr
    ) as bar:
        running = None
        for static, dtype, batch in _batches(entries, max_batch):
            bar.set_postfix(rows=batch[0].prepared.arrays.n_rows)
            started = (batch, dtype, _dispatch(static, dtype, batch, mesh))
            if running is not None:
                _collect(*running)
                bar.update(len(running[0]))
            running = started
        if running is not None:
            _collect(*running)
            bar.update(len(running[0]))


def _result_row(entry: _Entry) -> dict[str, Any]:
    """The output row of one entry; re-runs the single fit when checks fail."""
    if (
        not entry.error
        and entry.summary is not None
        and not entry.summary["checks_pass"]
    ):
        _single_fit_into(entry)
    if entry.error or entry.summary is None:
        return {
            "beta0": math.nan,
            "beta1": math.nan,
            "beta2": math.nan,
            "converged": False,
            "n_outer_iters": pd.NA,
            "stop_reason": "",
            "r2": math.nan,
            "rmse_seconds": math.nan,
            "n_phases": pd.NA,
            "error": entry.error or "not fitted",
        }
    summary = entry.summary
    beta = np.asarray(summary["beta"], dtype=np.float64)
    return {
        "beta0": float(beta[0]),
        "beta1": float(beta[1]),
        "beta2": float(beta[2]),
        "converged": bool(summary["converged"]),
        "n_outer_iters": int(summary["n_outer_iters"]),
        "stop_reason": stop_reason_name(int(summary["stop_code"])),
        "r2": float(summary["r2"]),
        "rmse_seconds": float(summary["rmse_seconds"]),
        "n_phases": int(summary["n_phases"]),
        "error": "",
    }


def _single_fit_into(entry: _Entry) -> None:
    """Runs ``estimate_betas_*`` on the entry alone (its exact error or result)."""
    settings = entry.settings
    try:
        result = _estimator(settings.static.algo)(
            entry.table,
            chunk_size=entry.chunk_size,
            min_duration_sec=entry.min_duration_sec,
            **settings.estimator_kwargs,
        )
    except ValueError as error:
        entry.error = _describe_error(error)
        return
    diagnostics = result.diagnostics
    entry.summary = {
        "beta": result.beta,
        "converged": result.converged,
        "n_outer_iters": getattr(result, "n_outer_iters", 0),
        "stop_code": STOP_CODES.index(result.stop_reason),
        "r2": diagnostics.get("final_r2", diagnostics.get("r2")),
        "rmse_seconds": diagnostics.get(
            "final_rmse_seconds", diagnostics.get("rmse_seconds")
        ),
        "n_phases": int(diagnostics["n_phases"]),
        "checks_pass": True,
    }


def _results_frame(rows: list[dict[str, Any]], index: pd.Index) -> pd.DataFrame:
    frame = pd.DataFrame(rows, index=index, columns=list(RESULT_COLUMNS))
    frame["converged"] = frame["converged"].astype(bool)
    frame["n_outer_iters"] = frame["n_outer_iters"].astype("Int64")
    frame["n_phases"] = frame["n_phases"].astype("Int64")
    for name in ("beta0", "beta1", "beta2", "r2", "rmse_seconds"):
        frame[name] = frame[name].astype(np.float64)
    frame["stop_reason"] = frame["stop_reason"].astype(object)
    frame["error"] = frame["error"].astype(object)
    return frame


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def fit_many(
    traces: Mapping[Hashable, pd.DataFrame | str | os.PathLike]
    | pd.DataFrame
    | str
    | os.PathLike,
    *,
    chunk_size: float | Mapping[Hashable, float],
    algo: str = "iterative",
    min_duration_sec: float | Mapping[Hashable, float] = 0.0,
    trace_col: str = "trace_id",
    progress: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    **options: Any,
) -> pd.DataFrame:
    """Fits many traces at once: one vmapped, jit-compiled call per size bucket.

    Each trace gets the answer ``estimate_betas_<algo>`` gives it alone: in
    float64 (the default), the same betas within 1e-9 relative (about 1e-13
    on the parity traces, where this is tested) and the same iteration
    counts (in float32 the batched arithmetic may round differently, by
    about float32's own precision). A trace that cannot be read
    or fails validation does not stop the others: its ``ValueError`` message
    lands in its row's ``error`` column and its betas are NaN.

    Args:
      traces: one of
        - a mapping name -> phase table (DataFrame) or path to a CSV/Parquet
          file;
        - one long DataFrame holding every trace, with a trace-id column
          ``trace_col`` (traces in order of first appearance);
        - a directory: every ``*.csv``, ``*.parquet`` and ``*.pq`` file in
          it (not recursive) is a trace named by its file stem; other files
          are ignored and listed in ``result.attrs["ignored_files"]``;
        - a path to one long CSV/Parquet table with a ``trace_col`` column.
      chunk_size: C (prefill tokens per step, > 0) for every trace, or a
        mapping name -> C.
      algo: ``"iterative"`` (default) or ``"baseline"``.
      min_duration_sec: clamp on phase durations (seconds, >= 0), one value
        or a mapping name -> value.
      trace_col: the trace-id column of a long table.
      progress: show tqdm progress bars (stderr).
      max_batch: most traces per compiled call (bounds device memory;
        rounded down to a power of two).
      **options: every keyword argument of ``estimate_betas_baseline``
        (``correction_mode``, column names, ``dtype``, ``loss``,
        ``huber_scale``) or ``estimate_betas_iterative`` (also
        ``prefill_correction_mode``, ``max_outer_iters``, ``tol``,
        ``damping_eta``, ``init_via_baseline_correction`` and jaxbeta's
        ``solver``, ``stop_rule``, ``prefill_update``, ``anderson_memory``,
        ``inner_iters``, ``accelerate_below``), validated as there and
        applied to every trace.

    Returns:
      A DataFrame indexed by trace name (input order; index name
      ``"trace"``) with columns ``beta0`` (s/step), ``beta1``, ``beta2``
      (s/token), ``converged`` (bool), ``n_outer_iters`` (Int64),
      ``stop_reason``, ``r2``, ``rmse_seconds`` (of the last NNLS fit),
      ``n_phases`` (Int64) and ``error`` ("" when the fit succeeded). For the
      baseline, ``converged`` is True, ``n_outer_iters`` 0 and
      ``stop_reason`` "converged". Failed rows have NaN betas and statistics,
      ``converged`` False, ``stop_reason`` "" and <NA> counts.

    Raises:
      ValueError: invalid ``algo`` or estimator options, a long table
        without (or with missing) trace ids, an empty directory or a path
        that does not exist. Problems of single traces never raise (a trace
        missing from a ``chunk_size`` or ``min_duration_sec`` mapping, or
        given an invalid value there, gets the message in its row; extra
        mapping keys are ignored).
      TypeError: an option the estimator does not take.
    """
    algo = _check_algo(algo)
    max_batch = _check_max_batch(max_batch)
    settings = _validated_settings(algo, _merge_options(algo, options, "fit_many"))
    sources, ignored = _collect_sources(traces, trace_col)
    names = [name for name, _ in sources]

    entries = []
    for name, source in tqdm(
        sources, desc="validate", unit="trace", disable=not progress, file=sys.stderr
    ):
        entry = _Entry(name=name, settings=settings)
        entries.append(entry)
        try:
            entry.chunk_size = check_chunk_size(
                _per_trace_value(chunk_size, name, "chunk_size")
            )
            entry.min_duration_sec = check_min_duration(
                _per_trace_value(min_duration_sec, name, "min_duration_sec")
            )
        except ValueError as error:
            entry.error = str(error)
            continue
        _prepare_entry(entry, source)

    _run_entries(entries, max_batch=max_batch, progress=progress, desc="fit")
    index = pd.Index(names, name="trace", tupleize_cols=False)
    frame = _results_frame([_result_row(entry) for entry in entries], index)
    frame.attrs["algo"] = algo
    frame.attrs["ignored_files"] = list(ignored)
    return frame


def _as_list(value: Any) -> list:
    """A list of settings from one value or a sequence of them."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    values = list(value)
    if not values:
        raise ValueError("a sweep setting was given as an empty list")
    return values


def sweep(
    phases: pd.DataFrame | str | os.PathLike,
    *,
    chunk_size: float | Sequence[float],
    algo: str = "iterative",
    min_duration_sec: float | Sequence[float] = 0.0,
    max_batch: int = DEFAULT_MAX_BATCH,
    **options: Any,
) -> pd.DataFrame:
    """Fits one trace under a grid of settings, one vmapped call per static mode.

    The grid is the cartesian product of every list-valued setting. The
    numeric ones are traced in the array fit and are vmapped over in one
    call: ``chunk_size`` (N_i = ceil(P/C) is recomputed from each C),
    ``min_duration_sec`` and, for the iterative fit, ``tol`` and
    ``damping_eta``. Correction modes are compile-time constants, so a list
    of ``correction_mode`` (baseline) or ``prefill_correction_mode`` /
    ``init_via_baseline_correction`` (iterative) means one call per mode.

    Args:
      phases: the phase table (DataFrame, or a CSV/Parquet path).
      chunk_size: C (tokens per step), one value or a list.
      algo: ``"iterative"`` (default) or ``"baseline"``.
      min_duration_sec: seconds, one value or a list.
      max_batch: most settings per compiled call.
      **options: as for :func:`fit_many`; ``tol``, ``damping_eta`` and the
        correction modes may be lists.

    Returns:
      One row per setting (RangeIndex, modes outermost, then ``chunk_size``,
      ``min_duration_sec``, ``damping_eta``, ``tol`` in the order given),
      with the setting columns (``chunk_size``, ``min_duration_sec`` and the
      correction mode(s); iterative also ``damping_eta``, ``tol``) followed
      by :data:`RESULT_COLUMNS`.

    Raises:
      ValueError: an invalid setting, or the trace fails validation.
      TypeError: an option the estimator does not take.
    """
    algo = _check_algo(algo)
    max_batch = _check_max_batch(max_batch)
    grid_names, grid_values = _sweep_grid(algo, chunk_size, min_duration_sec, options)
    base = _merge_options(algo, options, "sweep")
    combos = [
        dict(zip(grid_names, combo, strict=True))
        for combo in itertools.product(*grid_values)
    ]
    entries = [
        _Entry(
            name=index,
            settings=_validated_settings(
                algo, {**base, **{k: v for k, v in setting.items() if k in base}}
            ),
            chunk_size=check_chunk_size(setting["chunk_size"]),
            min_duration_sec=check_min_duration(setting["min_duration_sec"]),
        )
        for index, setting in enumerate(combos)
    ]
    # Columns and dtype are not sweep axes: one prepared trace serves all.
    table = load_table(phases)
    first = entries[0].settings
    prepared = prepare_trace(table, columns=first.columns, dtype=first.dtype)
    for entry in entries:
        entry.table, entry.prepared = table, prepared
    _run_entries(entries, max_batch=max_batch, progress=False, desc="sweep")

    rows = []
    for entry, setting in zip(entries, combos, strict=True):
        row = {**setting, "chunk_size": entry.chunk_size}
        row["min_duration_sec"] = entry.min_duration_sec
        if algo == "iterative":
            row["damping_eta"] = entry.settings.damping_eta
            row["tol"] = entry.settings.tol
        rows.append(row)
    results = _results_frame(
        [_result_row(entry) for entry in entries], pd.RangeIndex(len(entries))
    )
    settings_frame = pd.DataFrame(rows, columns=grid_names)
    frame = pd.concat([settings_frame, results], axis=1)
    frame.attrs["algo"] = algo
    return frame


def _sweep_grid(
    algo: str, chunk_size: Any, min_duration_sec: Any, options: dict
) -> tuple[list[str], list[list]]:
    """Names and value lists of the sweep's axes, static modes first.

    Removes the list-valued sweep axes from ``options`` (in place).
    """
    defaults = _option_defaults(algo)
    names, values = [], []
    for name in _STATIC_KEYWORDS[algo]:
        names.append(name)
        values.append(_as_list(options.pop(name, defaults[name])))
    names += ["chunk_size", "min_duration_sec"]
    values += [_as_list(chunk_size), _as_list(min_duration_sec)]
    if algo == "iterative":
        for name in ("damping_eta", "tol"):
            names.append(name)
            values.append(_as_list(options.pop(name, defaults[name])))
    return names, values


class ChunkSizeChoice(NamedTuple):
    """Result of :func:`best_chunk_size`."""

    chunk_size: float  # the candidate with the lowest rmse, tokens per step
    table: pd.DataFrame  # the sweep over the candidates (see :func:`sweep`)


def best_chunk_size(
    phases: pd.DataFrame | str | os.PathLike,
    *,
    candidates: Sequence[float],
    algo: str = "iterative",
    **options: Any,
) -> ChunkSizeChoice:
    """The candidate chunk size whose fit explains the phase durations best.

    A heuristic: every candidate C is fitted (one vmapped :func:`sweep`) and
    the one with the lowest ``rmse_seconds`` wins (ties: the first given).
    The rmse values are comparable across C because the regression target
    T_i (the phase durations) does not depend on C; only the features do,
    through N_i = ceil(P/C) and the prefill pressure C * n_pf. A wrong C
    usually misplaces the prefill steps and fits worse, but nothing
    guarantees it: with few prefill phases, or an ``N_steps`` column (which
    makes N_i independent of C), several candidates can fit about equally
    well, so look at the table before trusting the choice.

    Args:
      phases: the phase table (DataFrame, or a CSV/Parquet path).
      candidates: chunk sizes to try (tokens per step, each > 0).
      algo: ``"iterative"`` (default) or ``"baseline"``.
      **options: as for :func:`sweep` (single values or lists).

    Returns:
      ``ChunkSizeChoice(chunk_size, table)``.

    Raises:
      ValueError: no candidates, or no candidate could be fitted.
    """
    candidates = _as_list(candidates)
    table = sweep(phases, chunk_size=candidates, algo=algo, **options)
    usable = table[(table["error"] == "") & np.isfinite(table["rmse_seconds"])]
    if usable.empty:
        errors = sorted(set(table["error"]) - {""})
        raise ValueError(f"no candidate chunk size could be fitted: {errors}")
    best = usable.loc[usable["rmse_seconds"].idxmin()]
    return ChunkSizeChoice(chunk_size=float(best["chunk_size"]), table=table)


# ---------------------------------------------------------------------------
# Command line pieces (wired into ``jaxbeta fit-many`` by cli.py)
# ---------------------------------------------------------------------------


def add_fit_many_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``fit-many`` arguments to ``parser``.

    The estimator flags are those of ``jaxbeta fit`` (``add_estimator_arguments``),
    so ``--algo`` defaults to ``baseline`` there too; ``--chunk-size`` is
    required here (checked by :func:`run_fit_many`).
    """
    from jaxbeta.cli import add_estimator_arguments

    parser.add_argument(
        "path",
        help="directory of trace files (*.csv, *.parquet, *.pq; one trace per "
        "file, named by its stem), or one long CSV/Parquet table with a "
        "trace-id column (see --trace-col)",
    )
    add_estimator_arguments(parser)
    parser.add_argument(
        "--trace-col",
        default="trace_id",
        help="trace-id column when PATH is one long table (default trace_id)",
    )
    parser.add_argument(
        "--out",
        metavar="OUT",
        default=None,
        help="write the per-trace results table (.csv or .parquet)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars"
    )
    return parser


def run_fit_many(args: argparse.Namespace) -> int:
    """Runs ``jaxbeta fit-many``; prints a summary.

    Returns:
      0 when at least one trace was fitted, 1 when all failed.

    Raises:
      ValueError: bad options, an unreadable PATH or an unsupported --out
        extension (the CLI prints the message and exits 1).
    """
    if args.chunk_size is None:
        raise ValueError("fit-many needs --chunk-size")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"--out must end in .csv or .parquet, got {str(out)!r}")
    from jaxbeta.cli import estimator_options

    options = estimator_options(args)
    results = fit_many(
        args.path,
        chunk_size=args.chunk_size,
        algo=args.algo,
        min_duration_sec=args.min_duration_sec,
        trace_col=args.trace_col,
        progress=not args.no_progress,
        **options,
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".csv":
            results.to_csv(out)
        else:
            results.to_parquet(out)
    print(format_summary(results))
    if out is not None:
        print(f"wrote {out}")
    return 0 if (results["error"] == "").any() else 1


def format_summary(results: pd.DataFrame, *, max_failures: int = 10) -> str:
    """A one-screen summary of a :func:`fit_many` table."""
    ok = results[results["error"] == ""]
    failed = results[results["error"] != ""]
    algo = results.attrs.get("algo", "")
    lines = [
        f"fit-many ({algo}): {len(ok)} of {len(results)} trace(s) fitted, "
        f"{len(failed)} failed"
    ]
    if len(ok):
        converged = int(ok["converged"].sum())
        lines.append(
            f"converged: {converged} of {len(ok)} ({100.0 * converged / len(ok):.1f}%)"
        )
        lines.append(
            "median beta0 = {:.6g} s/step, beta1 = {:.6g} s/token, "
            "beta2 = {:.6g} s/token".format(
                *(float(ok[name].median()) for name in ("beta0", "beta1", "beta2"))
            )
        )
    if len(failed):
        lines.append("failed:")
        for name, error in failed["error"].head(max_failures).items():
            first_line = str(error).splitlines()[0] if error else ""
            lines.append(f"  {name}: {first_line}")
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more")
    ignored = results.attrs.get("ignored_files") or []
    if ignored:
        shown = ", ".join(ignored[:10])
        more = ", ..." if len(ignored) > 10 else ""
        lines.append(
            f"ignored {len(ignored)} file(s) not ending in "
            f"{'/'.join(TRACE_SUFFIXES)}: {shown}{more}"
        )
    return "\n".join(lines)
