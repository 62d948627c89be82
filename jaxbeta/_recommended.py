"""The recommended estimator: :func:`fit`.

The reference's iterative estimator often ends in a period-2 cycle, stops on
an absolute tolerance that is larger than beta1 on fast engines, and spreads
the partial last chunk onto the segment *after* each prefill. :func:`fit`
seeks the same kind of fixed point with the options of
``jaxbeta._fixed_point``, chosen on the accuracy benchmark
(``benchmarks/ACCURACY.md``, 648 simulated traces). Its defaults are in
:data:`RECOMMENDED`; every one can be overridden by keyword.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxbeta._api import (
    _columns,
    budget_weights,
    check_accelerate_below,
    check_loop_settings,
    check_mode,
    check_token_budget,
    iterative_result,
)
from jaxbeta._arrays import PhaseArrays
from jaxbeta._boundary import check_chunk_size, check_min_duration, prepare_trace
from jaxbeta._fixed_point import check_solver_options
from jaxbeta._grid import phase_durations, phase_steps
from jaxbeta._iterative import (
    INIT_MODES,
    ITERATIVE_MODES,
    fit_iterative_arrays,
)
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
FLOAT32_TOL = 1e-5
"""fit's default ``tol`` with ``dtype="float32"``."""
# Chosen on benchmarks/ACCURACY.md; change them only with a new benchmark run.


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
    max_num_batched_tokens: float | None = None,
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
    """Recommended estimate of (beta0, beta1, beta2) from a phase trace.

    The MM fixed point of SPEC section 7 with four changes, each chosen on
    the accuracy benchmark (``benchmarks/ACCURACY.md``, 648 simulated traces
    of known betas; command ``python benchmarks/bench_accuracy.py``):

    - ``prefill_correction_mode="end_inside"``: the tokens missing from a
      prefill's last chunk are taken off the segment that *ends* at the
      prefill's end, where the last step runs (the reference's ``end`` puts
      them on the next segment). With it, the true betas are an exact fixed
      point of the MM map on traces that satisfy the SPEC's assumptions.
    - ``prefill_update="consistent"``: the effective prefill pressure is
      solved for the current beta instead of lagged one iteration; the
      lagged update oscillates on large chunks and drives the reference into
      its 2-cycles.
    - ``solver="anderson"``: safeguarded Anderson acceleration (plain steps
      until within 5%, damping halved on oscillation, rejected steps fall
      back to the damped plain step). ``newton`` reaches the same points in
      fewer but dearer iterations (8 vs 7 ms per fit on the benchmark,
      host work included).
    - ``stop_rule="relative"``, ``tol=1e-9``: every coefficient settled to
      1e-9 of its own size (the reference's 1e-6 s absolute rule stops fast
      engines with beta1 percents off).
    - ``row_weight="inverse_variance"``: rows weighted by N_i / T_i^2, the
      inverse variance of a sum of N_i steps with independent relative noise;
      it beats equal weights on noisy traces and ``inverse_duration`` on the
      benchmark's median + p90 + max summed over the betas.

    Evidence (``benchmarks/ACCURACY.md``; relative errors, median / max;
    ``max_num_batched_tokens`` given on the traces simulated with a budget):

    - converges on all 648 traces (the reference's defaults: 59%), in at most
      21 iterations (median 7);
    - traces satisfying the SPEC's assumptions (no noise, no binding token
      budget; 198): worst coefficient error 1.2e-7 % (reference: 305%);
    - noisy traces (5% step noise; 324): beta0 0.068% / 2.0%, beta1 0.32% /
      3.3%, beta2 1.21% / 6.6%; the simulator's step log itself, fitted by
      least squares, allows 0.052%, 0.18% and 0.91% medians;
    - noise-free traces whose budget binds (126): beta2 0.0068% / 2.4%
      (budget not given: 0.011% / 21%);
    - all 648 traces: medians beta0 0.012%, beta1 0.053%, beta2 0.186%
      (327 of 648 within 0.2% on beta2; budget not given: 0.204%, 322).

    Args:
      phases: one row per phase instance (DataFrame, or a CSV/Parquet path).
      chunk_size: C, prefill tokens per engine step (> 0).
      max_num_batched_tokens: the engine's per-step token budget B, if it
        has one that can bind (vLLM's ``max_num_batched_tokens``; decodes
        take one token each first, prefill chunks share the rest first come
        first served). Default None: no budget, as in the SPEC. With it,
        ptilde is capped at ``B - p_dec`` on every segment and the prefill
        rows that overlap a segment where the chunks asked for exceed the
        cap get weight 0 (their step count is no longer ``ceil(P / C)``);
        ``diagnostics["n_budget_bound_prefill"]`` counts them. Without it a
        binding budget biases the fit (``benchmarks/ACCURACY.md``).
      min_duration_sec: clamp T_i = max(t_end - t_start, min_duration_sec).
      request_id_col, phase_type_col, t_start_col, t_end_col,
        prefill_tokens_col, decode_tokens_col, n_steps_col: column names.
      dtype: ``float64`` (default) or ``float32`` (then ``tol`` defaults to
        ``FLOAT32_TOL``, 1e-5).
      n_pad: padded row count (default: the next power of two); traces with
        the same ``n_pad`` share one compiled program.
      **options: overrides of :data:`RECOMMENDED`: ``row_weight`` (``none``,
        ``inverse_duration``, ``inverse_variance``) and the keywords of
        :func:`jaxbeta.estimate_betas_iterative` (``prefill_correction_mode``,
        ``init_via_baseline_correction``, ``prefill_update``, ``solver``,
        ``stop_rule``, ``tol``, ``max_outer_iters``, ``damping_eta``,
        ``anderson_memory``, ``inner_iters``, ``accelerate_below``).

    Returns:
      An :class:`IterativeResult` with ``algo == "recommended"``: beta0
      (s/step), beta1, beta2 (s/token), ``converged``, ``stop_reason``,
      ``history`` and ``diagnostics`` (including ``cond_scaled``,
      ``beta_std_error`` and identifiability ``warnings``); ``settings``
      records every option used. With row weights, ``final_r2`` and
      ``final_rmse_seconds`` are the weighted ones.

    Raises:
      ValueError: for invalid parameters, unknown options or bad rows.

    Example:
      >>> result = jaxbeta.fit(phases, chunk_size=512)
      >>> result.beta, result.stop_reason, result.diagnostics["warnings"]
    """
    unknown = sorted(set(options) - set(RECOMMENDED))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; fit accepts {sorted(RECOMMENDED)}"
        )
    settings = {**RECOMMENDED, **options}
    if "tol" not in options and resolve_dtype(dtype) == np.float32:
        # 1e-9 is below float32 resolution: the loop would never stop.
        settings["tol"] = FLOAT32_TOL
    chunk = check_chunk_size(chunk_size)
    budget = check_token_budget(max_num_batched_tokens)
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
        weight, token_budget, n_budget_bound = budget_weights(
            prepared, chunk, budget, np_dtype, weight
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
            token_budget=token_budget,
        )
        result, weight = jax.device_get((result, weight))
    settings = {
        "algo": "recommended",
        "max_num_batched_tokens": budget,
        "min_duration_sec": min_duration,
        **settings,
        "dtype": np_dtype.name,
    }
    record = iterative_result(result, prepared, chunk, settings, weight=weight)
    record.diagnostics["n_budget_bound_prefill"] = n_budget_bound
    return dataclasses.replace(record, algo="recommended")
