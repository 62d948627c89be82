"""The recommended estimator: :func:`fit`.

PROVISIONAL: defaults to be set from benchmarks/ACCURACY.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pandas as pd

from jaxbeta._api import (
    _columns,
    check_accelerate_below,
    check_loop_settings,
    check_mode,
    iterative_result,
)
from jaxbeta._arrays import PhaseArrays
from jaxbeta._boundary import check_chunk_size, check_min_duration, prepare_trace
from jaxbeta._fixed_point import check_solver_options
from jaxbeta._grid import phase_durations, phase_steps
from jaxbeta._iterative import INIT_MODES, ITERATIVE_MODES, fit_iterative_arrays
from jaxbeta._precision import precision_context, resolve_dtype
from jaxbeta._results import IterativeResult

__all__ = ["RECOMMENDED", "ROW_WEIGHTS", "fit", "phase_weights"]

ROW_WEIGHTS = ("none", "inverse_duration", "inverse_variance")
"""Row weightings of :func:`fit` (see :func:`phase_weights`)."""

RECOMMENDED = {
    "row_weight": "inverse_variance",
    "prefill_correction_mode": "end_inside",
    "init_via_baseline_correction": "end_inside",
    "prefill_update": "consistent",
    "solver": "anderson",
    "stop_rule": "relative",
    "tol": 1e-9,
    "max_outer_iters": 100,
    "damping_eta": 1.0,
    "anderson_memory": 3,
    "inner_iters": 4,
    "accelerate_below": 0.05,
}
"""The defaults of :func:`fit` (see its docstring for the evidence)."""


def phase_weights(
    arrays: PhaseArrays,
    chunk_size: jax.Array,
    min_duration_sec: jax.Array,
    row_weight: str,
) -> jax.Array | None:
    """Least-squares weight of every phase row, or None for equal weights.

    A phase of N_i steps lasts T_i = sum of its step times; with independent
    relative noise of the step times its variance is proportional to
    ``T_i^2 / N_i``. ``inverse_variance`` weights rows by ``N_i / T_i^2``,
    ``inverse_duration`` by ``1 / T_i`` (between equal weights and inverse
    variance: it stops the longest phases from dominating the fit). Weights
    are normalised to mean 1 over the valid rows; padding rows get 0.

    Args:
      arrays: the padded trace.
      chunk_size: C, tokens per step.
      min_duration_sec: clamp of T_i, seconds.
      row_weight: ``none``, ``inverse_duration`` or ``inverse_variance``.

    Returns:
      [n] weights, or None for ``none``.
    """
    if row_weight == "none":
        return None
    duration = phase_durations(arrays, min_duration_sec)
    valid = arrays.valid & (duration > 0)
    safe = jnp.where(valid, duration, 1.0)
    if row_weight == "inverse_duration":
        raw = 1.0 / safe
    elif row_weight == "inverse_variance":
        raw = jnp.maximum(phase_steps(arrays, chunk_size), 1.0) / safe**2
    else:
        raise ValueError(
            f"`row_weight` must be one of {list(ROW_WEIGHTS)}, got {row_weight!r}"
        )
    raw = jnp.where(valid, raw, 0.0)
    return raw * (jnp.sum(valid) / jnp.sum(raw))


def fit(
    phases: pd.DataFrame | str,
    *,
    chunk_size: float,
    min_duration_sec: float = 0.0,
    request_id_col: str = "request_id",
    phase_type_col: str = "phase_type",
    t_start_col: str = "t_start",
    t_end_col: str = "t_end",
    prefill_tokens_col: str = "prefill_tokens",
    decode_tokens_col: str = "decode_tokens",
    n_steps_col: str = "N_steps",
    dtype: str = "float64",
    n_pad: int | None = None,
    **options,
) -> IterativeResult:
    """Recommended estimate of (beta0, beta1, beta2). PROVISIONAL."""
    unknown = sorted(set(options) - set(RECOMMENDED))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; fit accepts {sorted(RECOMMENDED)}"
        )
    settings = {**RECOMMENDED, **options}
    chunk = check_chunk_size(chunk_size)
    min_duration = check_min_duration(min_duration_sec)
    check_mode("row_weight", settings["row_weight"], ROW_WEIGHTS)
    check_mode(
        "prefill_correction_mode", settings["prefill_correction_mode"], ITERATIVE_MODES
    )
    check_mode(
        "init_via_baseline_correction",
        settings["init_via_baseline_correction"],
        INIT_MODES,
    )
    iters, tol_value, eta = check_loop_settings(
        settings["max_outer_iters"], settings["tol"], settings["damping_eta"]
    )
    check_solver_options(
        settings["solver"],
        settings["stop_rule"],
        settings["prefill_update"],
        settings["anderson_memory"],
        settings["inner_iters"],
    )
    accelerate = check_accelerate_below(settings["accelerate_below"])
    settings.update(
        max_outer_iters=iters,
        tol=tol_value,
        damping_eta=eta,
        accelerate_below=accelerate,
        anderson_memory=int(settings["anderson_memory"]),
        inner_iters=int(settings["inner_iters"]),
    )
    np_dtype = resolve_dtype(dtype)
    columns = _columns(
        request_id_col, phase_type_col, t_start_col, t_end_col,
        prefill_tokens_col, decode_tokens_col, n_steps_col,
    )  # fmt: skip
    prepared = prepare_trace(phases, columns=columns, n_pad=n_pad, dtype=np_dtype)
    with precision_context(np_dtype):
        weight = phase_weights(
            prepared.arrays,
            np_dtype.type(chunk),
            np_dtype.type(min_duration),
            settings["row_weight"],
        )
        result = fit_iterative_arrays(
            prepared.arrays,
            np_dtype.type(chunk),
            np_dtype.type(min_duration),
            weight=weight,
            prefill_correction_mode=settings["prefill_correction_mode"],
            max_outer_iters=iters,
            tol=np_dtype.type(tol_value),
            damping_eta=np_dtype.type(eta),
            init_via_baseline_correction=settings["init_via_baseline_correction"],
            solver=settings["solver"],
            stop_rule=settings["stop_rule"],
            prefill_update=settings["prefill_update"],
            anderson_memory=settings["anderson_memory"],
            inner_iters=settings["inner_iters"],
            accelerate_below=np_dtype.type(accelerate),
        )
        result, weight = jax.device_get((result, weight))
    settings = {
        "algo": "recommended",
        "min_duration_sec": min_duration,
        **settings,
        "dtype": np_dtype.name,
    }
    record = iterative_result(result, prepared, chunk, settings, weight=weight)
    return dataclasses.replace(record, algo="recommended")
