"""Public, reference-compatible entry points (host side).

Each call validates the table (``_boundary``), runs the jit-compiled array
fit in the requested precision and converts the result to a frozen record of
host values.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxbeta._baseline import fit_baseline_arrays
from jaxbeta._boundary import (
    ColumnNames,
    PreparedTrace,
    check_chunk_size,
    check_min_duration,
    prepare_trace,
)
from jaxbeta._correction import TRACE_ONLY_MODES
from jaxbeta._fixed_point import check_solver_options
from jaxbeta._iterative import (
    INIT_MODES,
    ITERATIVE_MODES,
    budget_bound_rows,
    fit_iterative_arrays,
    stop_reason_name,
)
from jaxbeta._precision import precision_context, resolve_dtype
from jaxbeta._results import BaselineResult, IterativeResult
from jaxbeta._robust import check_huber_scale, check_loss

__all__ = [
    "baseline_result",
    "estimate_betas_baseline",
    "coefficient_std_errors",
    "estimate_betas_iterative",
    "identifiability_warnings",
    "iterative_result",
]

COND_WARN = 1e8
"""Scaled condition number of X^T X above which the design counts as nearly
rank-deficient (well-posed traces have 5 to 40; see the parity README)."""
REL_STD_ERROR_WARN = 0.05
"""A positive coefficient whose standard error exceeds this fraction of its
value is reported as poorly determined. (On the accuracy benchmark's noisy
traces the actual error was a median 1.0-1.5 times, and a 90th percentile
about 3 times, the standard error.)"""


def _columns(
    request_id_col, phase_type_col, t_start_col, t_end_col,
    prefill_tokens_col, decode_tokens_col, n_steps_col,
) -> ColumnNames:  # fmt: skip
    return ColumnNames(
        request_id=request_id_col,
        phase_type=phase_type_col,
        t_start=t_start_col,
        t_end=t_end_col,
        prefill_tokens=prefill_tokens_col,
        decode_tokens=decode_tokens_col,
        n_steps=n_steps_col,
    )


def check_mode(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Raises ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")
    return value


def coefficient_std_errors(
    design: np.ndarray,
    target: np.ndarray,
    beta: np.ndarray,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Least-squares standard errors of the positive coefficients.

    ``sqrt(diag(sigma^2 (X_S^T W X_S)^-1))`` over the support S (the positive
    coefficients), with ``sigma^2 = sum(w r^2) / (n - |S|)`` from the fit's
    residuals r. It treats the design as fixed and the rows as independent,
    so it understates the uncertainty when phases overlap (they share step
    noise); read it as a lower bound and as a collinearity signal.

    Args:
      design: [n, 3] design rows (steps, prefill exposure, decode exposure).
      target: [n] durations T_i, seconds.
      beta: [3] the estimate.
      weight: optional [n] row weights of the fit.

    Returns:
      [3] standard errors in the units of beta (NaN for coefficients at 0 and
      when there are no spare degrees of freedom).
    """
    design = np.asarray(design, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    weight = np.ones(len(target)) if weight is None else np.asarray(weight, float)
    errors = np.full(3, np.nan)
    free = np.asarray(beta) > 0
    rows = int(np.sum(weight > 0))
    spare = rows - int(free.sum())
    if not free.any() or spare <= 0:
        return errors
    residual = target - design @ beta
    sigma2 = float(np.sum(weight * residual**2)) / spare
    columns = design[:, free]
    gram = columns.T @ (weight[:, None] * columns)
    scale = np.sqrt(np.diag(gram))
    if not np.all(scale > 0):
        return errors
    covariance = np.linalg.pinv(gram / np.outer(scale, scale)) / np.outer(scale, scale)
    errors[free] = np.sqrt(np.maximum(np.diag(covariance) * sigma2, 0.0))
    return errors


def _condition_number(design: np.ndarray, weight: np.ndarray | None) -> float:
    """Scaled condition number of the Gram matrix of the non-zero columns."""
    weight = np.ones(len(design)) if weight is None else np.asarray(weight, float)
    gram = design.T @ (weight[:, None] * design)
    keep = np.diag(gram) > 0
    if not keep.any():
        return np.inf
    gram = gram[np.ix_(keep, keep)]
    scale = np.sqrt(np.diag(gram))
    eigenvalues = np.linalg.eigvalsh(gram / np.outer(scale, scale))
    return float(eigenvalues[-1] / max(eigenvalues[0], 0.0))


def identifiability_warnings(
    beta: np.ndarray,
    cond_scaled: float,
    design: np.ndarray,
    std_error: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> list[str]:
    """Plain-language caveats about coefficients the trace cannot pin down.

    Args:
      beta: [3] the estimate.
      cond_scaled: scaled condition number of the NNLS Gram matrix.
      design: [n, 3] the NNLS design.
      std_error: optional [3] standard errors (see
        :func:`coefficient_std_errors`); a positive coefficient whose error
        exceeds ``REL_STD_ERROR_WARN`` of its value gets a note.
      weight: optional [n] row weights of the fit.

    Returns:
      Notes, in this order: per coefficient (zero column, at the bound 0,
      poorly determined), then the design's near rank deficiency.
    """
    notes = []
    names = ("beta0", "beta1", "beta2")
    column_norm = np.sqrt(np.sum(design**2, axis=0))
    for j, name in enumerate(names):
        if column_norm[j] == 0:
            notes.append(
                f"{name} multiplies an all-zero design column: the trace has no "
                "information about it (reported as 0)"
            )
        elif beta[j] == 0:
            notes.append(
                f"{name} sits at the bound 0: the non-negativity constraint is "
                "active, so the trace does not support a positive value"
            )
        elif std_error is not None and std_error[j] > REL_STD_ERROR_WARN * beta[j]:
            notes.append(
                f"{name} is poorly determined: its standard error is "
                f"{std_error[j] / beta[j]:.0%} of its value"
            )
    if (column_norm == 0).any():
        # An all-zero column is reported above; judge the others on their own.
        cond_scaled = _condition_number(design, weight)
    if not np.isfinite(cond_scaled) or cond_scaled > COND_WARN:
        notes.append(
            f"the NNLS design is nearly rank-deficient (scaled condition number "
            f"{cond_scaled:.3g}): the betas are not uniquely determined"
        )
    return notes


def _warn_rank_deficiency(notes: list[str]) -> None:
    for note in notes:
        if "rank-deficient" in note:
            warnings.warn(note, UserWarning, stacklevel=3)


def _check_finite_features(prepared: PreparedTrace, named: dict[str, np.ndarray]):
    for name, values in named.items():
        bad = ~np.isfinite(values)
        if bad.any():
            rows = list(prepared.index[np.flatnonzero(bad)[:5]])
            raise ValueError(
                f"non-finite {name} in {int(bad.sum())} row(s), e.g. rows {rows}"
            )


def estimate_betas_baseline(
    phases: pd.DataFrame | str,
    *,
    chunk_size: float,
    request_id_col: str = "request_id",
    phase_type_col: str = "phase_type",
    t_start_col: str = "t_start",
    t_end_col: str = "t_end",
    prefill_tokens_col: str = "prefill_tokens",
    decode_tokens_col: str = "decode_tokens",
    n_steps_col: str = "N_steps",
    min_duration_sec: float = 0.0,
    correction_mode: str = "end",
    dtype: str = "float64",
    loss: str = "squared",
    huber_scale: float | None = None,
) -> BaselineResult:
    """Baseline time-integrated NNLS estimate of (beta0, beta1, beta2).

    A drop-in for the reference's entry point (SPEC section 6).

    Args:
      phases: one row per phase instance (DataFrame, or a CSV/Parquet path).
      chunk_size: C, prefill tokens per engine step (> 0).
      request_id_col, phase_type_col, t_start_col, t_end_col,
        prefill_tokens_col, decode_tokens_col, n_steps_col: column names.
        ``n_steps_col`` is optional in the table; when present its values are
        the authoritative step counts N_i.
      min_duration_sec: clamp T_i = max(t_end - t_start, min_duration_sec).
      correction_mode: partial-chunk correction, ``end`` (default, the
        reference's), ``uniform``, ``none``, or jaxbeta's ``end_inside``.
      dtype: ``float64`` (default; needed for parity) or ``float32``.
      loss: ``squared`` (default, the reference's least squares) or ``huber``
        (robust to a few corrupted phases; see ``jaxbeta._robust``).
      huber_scale: Huber delta in seconds; ``None`` (default) uses
        ``1.345 * 1.4826 * median |r_i|`` of the squared-loss fit.

    Returns:
      A :class:`BaselineResult` with ``beta0`` (s/step), ``beta1``,
      ``beta2`` (s/token), ``diagnostics`` and per-row ``features``.

    Raises:
      ValueError: for invalid parameters or rows (the message names them).
    """
    chunk = check_chunk_size(chunk_size)
    min_duration = check_min_duration(min_duration_sec)
    check_mode("correction_mode", correction_mode, TRACE_ONLY_MODES)
    check_loss(loss)
    huber_value = check_huber_scale(huber_scale)
    np_dtype = resolve_dtype(dtype)
    columns = _columns(
        request_id_col, phase_type_col, t_start_col, t_end_col,
        prefill_tokens_col, decode_tokens_col, n_steps_col,
    )  # fmt: skip
    prepared = prepare_trace(phases, columns=columns, dtype=np_dtype)
    with precision_context(np_dtype):
        fit = fit_baseline_arrays(
            prepared.arrays,
            np_dtype.type(chunk),
            np_dtype.type(min_duration),
            correction_mode=correction_mode,
            loss=loss,
            huber_scale=None if huber_value is None else np_dtype.type(huber_value),
        )
        fit = jax.device_get(fit)
    settings = {
        "min_duration_sec": min_duration,
        "correction_mode": correction_mode,
        "dtype": np_dtype.name,
        "loss": loss,
        "huber_scale": huber_value,
    }
    return baseline_result(fit, prepared, chunk, settings)


def _row_columns(fit, n: int) -> tuple[np.ndarray, ...]:
    """(N_i, T_i, prefill exposure, decode exposure) of the real rows, float64."""
    return tuple(
        np.asarray(values[:n], dtype=np.float64)
        for values in (
            fit.steps,
            fit.duration,
            fit.exposure_prefill,
            fit.exposure_decode,
        )
    )


def baseline_result(
    fit, prepared: PreparedTrace, chunk: float, settings: dict[str, Any]
) -> BaselineResult:
    """Converts a host copy of a ``BaselineFit`` to the public record."""
    n = prepared.n_phases
    steps, duration, exposure_prefill, exposure_decode = _row_columns(fit, n)
    with np.errstate(over="ignore", invalid="ignore"):
        step_rate_hat = steps / duration
    _check_finite_features(
        prepared,
        {
            "N_i": steps,
            "T_i": duration,
            "lambda_hat_i": step_rate_hat,
            "A_pf_i": exposure_prefill,
            "A_dec_i": exposure_decode,
        },
    )
    beta = np.asarray(fit.beta, dtype=np.float64)
    if not np.all(np.isfinite(beta)):
        raise ValueError(f"the NNLS fit produced non-finite betas {beta.tolist()}")
    design = np.stack([steps, exposure_prefill, exposure_decode], axis=1)
    cond = float(fit.stats.cond_scaled)
    std_error = coefficient_std_errors(design, duration, beta)
    notes = identifiability_warnings(beta, cond, design, std_error)
    diagnostics = {
        "n_phases": float(n),
        "r2": float(fit.stats.r2),
        "rmse_seconds": float(fit.stats.rmse_seconds),
        "mean_duration_seconds": float(duration.mean()),
        "mean_steps": float(steps.mean()),
        "mean_A_pf_tokens": float(exposure_prefill.mean()),
        "mean_A_dec_tokens": float(exposure_decode.mean()),
        "cond_scaled": cond,
        "beta_std_error": [float(v) for v in std_error],
        "warnings": notes,
    }
    _warn_rank_deficiency(notes)
    features = pd.DataFrame(
        {
            "N_i": steps,
            "T_i": duration,
            "A_pf_i": exposure_prefill,
            "A_dec_i": exposure_decode,
        },
        index=prepared.index,
    )
    return BaselineResult(
        beta0=float(beta[0]),
        beta1=float(beta[1]),
        beta2=float(beta[2]),
        diagnostics=diagnostics,
        features=features,
        chunk_size=chunk,
        settings=settings,
    )


def estimate_betas_iterative(
    phases: pd.DataFrame | str,
    *,
    chunk_size: float,
    request_id_col: str = "request_id",
    phase_type_col: str = "phase_type",
    t_start_col: str = "t_start",
    t_end_col: str = "t_end",
    prefill_tokens_col: str = "prefill_tokens",
    decode_tokens_col: str = "decode_tokens",
    n_steps_col: str = "N_steps",
    min_duration_sec: float = 0.0,
    prefill_correction_mode: str = "beta_informed",
    max_outer_iters: int = 25,
    tol: float = 1e-6,
    damping_eta: float = 1.0,
    init_via_baseline_correction: str = "end",
    dtype: str = "float64",
    loss: str = "squared",
    huber_scale: float | None = None,
    solver: str = "picard",
    stop_rule: str = "absolute",
    prefill_update: str = "lagged",
    anderson_memory: int = 3,
    inner_iters: int = 4,
    accelerate_below: float = 0.05,
    max_num_batched_tokens: float | None = None,
) -> IterativeResult:
    """Iterative MM step-density reweighting estimate (SPEC section 7).

    A drop-in for the reference's entry point: with the defaults it runs the
    same iterations with the same stop rule (``d < tol``, strict) and returns
    the last iterate, also when the loop ends in a period-2 cycle (then
    ``stop_reason == "cycle"``).

    Args:
      phases: one row per phase instance (DataFrame, or a CSV/Parquet path).
      chunk_size: C, prefill tokens per engine step (> 0).
      request_id_col, phase_type_col, t_start_col, t_end_col,
        prefill_tokens_col, decode_tokens_col, n_steps_col: column names.
      min_duration_sec: clamp T_i = max(t_end - t_start, min_duration_sec).
      prefill_correction_mode: ``beta_informed`` (default), ``end``,
        ``uniform``, ``none``, or jaxbeta's ``end_inside``.
      max_outer_iters: iteration cap (> 0).
      tol: absolute tolerance on ``||beta^(m) - beta^(m-1)||_2`` (> 0).
      damping_eta: eta in (0, 1]; ``beta^(m) = (1-eta) beta^(m-1) + eta fit``.
      init_via_baseline_correction: correction mode of the baseline
        initialisation: ``end`` (default), ``uniform``, ``none``,
        ``end_inside``.
      dtype: ``float64`` (default) or ``float32``.
      loss: ``squared`` (default) or ``huber``: every NNLS fit, the
        initialisation included, minimises the Huber loss.
      huber_scale: Huber delta in seconds, fixed for the whole fit; ``None``
        (default) uses ``1.345 * 1.4826 * median |r_i|`` of the squared-loss
        initialisation fit.
      solver: jaxbeta's option: ``picard`` (default, the reference's plain
        iteration), ``anderson`` or ``newton`` (safeguarded accelerations of
        the same fixed point; see ``jaxbeta._fixed_point``).
      stop_rule: jaxbeta's option: ``absolute`` (default, ``||d||_2 < tol``
        in seconds) or ``relative`` (every coefficient's change below ``tol``
        of its own size; a coefficient at 0 never blocks).
      prefill_update: jaxbeta's option: ``lagged`` (default, the reference's)
        or ``consistent`` (the effective prefill pressure solved for the
        current beta instead of carried from the previous iteration).
      anderson_memory: past differences kept by ``solver="anderson"`` (>= 1).
      inner_iters: sweeps of the ``consistent`` update per iteration with
        ``beta_informed`` (>= 1).
      accelerate_below: ``anderson``/``newton`` accelerate only once every
        coefficient's plain step is below this fraction of its size (> 0).
      max_num_batched_tokens: jaxbeta's option: the engine's per-step token
        budget B, or None (default: no budget, as in the SPEC); see
        :func:`jaxbeta.fit`, which documents the model.

    Returns:
      An :class:`IterativeResult`. The defaults reproduce the reference.

    Raises:
      ValueError: for invalid parameters or rows (the message names them).
    """
    chunk = check_chunk_size(chunk_size)
    min_duration = check_min_duration(min_duration_sec)
    check_mode("prefill_correction_mode", prefill_correction_mode, ITERATIVE_MODES)
    check_mode("init_via_baseline_correction", init_via_baseline_correction, INIT_MODES)
    iters, tol_value, eta = check_loop_settings(max_outer_iters, tol, damping_eta)
    huber_value, accelerate = check_jaxbeta_options(
        loss,
        huber_scale,
        solver,
        stop_rule,
        prefill_update,
        anderson_memory,
        inner_iters,
        accelerate_below,
    )
    budget = check_token_budget(max_num_batched_tokens)
    np_dtype = resolve_dtype(dtype)
    columns = _columns(
        request_id_col, phase_type_col, t_start_col, t_end_col,
        prefill_tokens_col, decode_tokens_col, n_steps_col,
    )  # fmt: skip
    prepared = prepare_trace(phases, columns=columns, dtype=np_dtype)
    with precision_context(np_dtype):
        weight, token_budget, n_budget_bound = budget_weights(
            prepared, chunk, budget, np_dtype
        )
        fit = fit_iterative_arrays(
            prepared.arrays,
            np_dtype.type(chunk),
            np_dtype.type(min_duration),
            prefill_correction_mode=prefill_correction_mode,
            max_outer_iters=iters,
            tol=np_dtype.type(tol_value),
            damping_eta=np_dtype.type(eta),
            init_via_baseline_correction=init_via_baseline_correction,
            loss=loss,
            huber_scale=None if huber_value is None else np_dtype.type(huber_value),
            solver=solver,
            stop_rule=stop_rule,
            prefill_update=prefill_update,
            anderson_memory=int(anderson_memory),
            inner_iters=int(inner_iters),
            accelerate_below=np_dtype.type(accelerate),
            weight=weight,
            token_budget=token_budget,
        )
        fit, weight = jax.device_get((fit, weight))
    settings = {
        "max_num_batched_tokens": budget,
        "min_duration_sec": min_duration,
        "prefill_correction_mode": prefill_correction_mode,
        "max_outer_iters": iters,
        "tol": tol_value,
        "damping_eta": eta,
        "init_via_baseline_correction": init_via_baseline_correction,
        "dtype": np_dtype.name,
        "loss": loss,
        "huber_scale": huber_value,
        "solver": solver,
        "stop_rule": stop_rule,
        "prefill_update": prefill_update,
        "anderson_memory": int(anderson_memory),
        "inner_iters": int(inner_iters),
        "accelerate_below": accelerate,
    }
    result = iterative_result(fit, prepared, chunk, settings, weight=weight)
    result.diagnostics["n_budget_bound_prefill"] = n_budget_bound
    return result


def budget_weights(
    prepared: PreparedTrace,
    chunk: float,
    budget: float | None,
    np_dtype,
    weight: jax.Array | None = None,
) -> tuple[jax.Array | None, Any, int]:
    """Row weights with a token budget's set-aside prefill rows at 0.

    Args:
      prepared: the prepared trace.
      chunk: C, tokens per step.
      budget: B (``max_num_batched_tokens``), or None.
      np_dtype: the fit's float dtype.
      weight: [n_pad] row weights to start from (None: 1 on valid rows).

    Returns:
      ``(weight, token_budget, n_set_aside)``: ``weight`` unchanged and
      ``token_budget`` None without a budget; otherwise the weights with the
      rows of :func:`jaxbeta._iterative.budget_bound_rows` at 0 (the fit
      zeroes them too; the result's diagnostics need them), B as an array
      scalar of ``np_dtype`` and how many rows were set aside.
    """
    if budget is None:
        return weight, None, 0
    token_budget = np_dtype.type(budget)
    bound = budget_bound_rows(prepared.arrays, np_dtype.type(chunk), token_budget)
    if weight is None:
        weight = prepared.arrays.valid.astype(np_dtype)
    return jnp.where(bound, 0.0, weight), token_budget, int(jnp.sum(bound))


def check_jaxbeta_options(
    loss: Any,
    huber_scale: Any,
    solver: Any,
    stop_rule: Any,
    prefill_update: Any,
    anderson_memory: Any,
    inner_iters: Any,
    accelerate_below: Any,
) -> tuple[float | None, float]:
    """Validates the iterative estimator's jaxbeta-only options.

    Returns:
      ``(huber_scale, accelerate_below)`` as floats (``huber_scale`` may be
      None: the automatic scale).

    Raises:
      ValueError: an unknown option value, or ``loss="huber"`` with a
        non-default solver option.
    """
    check_loss(loss)
    huber_value = check_huber_scale(huber_scale)
    check_solver_options(
        solver, stop_rule, prefill_update, anderson_memory, inner_iters
    )
    accelerate = check_accelerate_below(accelerate_below)
    if loss == "huber" and (solver, stop_rule, prefill_update) != (
        "picard",
        "absolute",
        "lagged",
    ):
        raise ValueError(
            "loss='huber' works with the default solver options only "
            "(solver='picard', stop_rule='absolute', prefill_update='lagged'), "
            f"got solver={solver!r}, stop_rule={stop_rule!r}, "
            f"prefill_update={prefill_update!r}"
        )
    return huber_value, accelerate


def _as_float(name: str, value: Any, expected: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}") from None


def check_token_budget(token_budget: Any, name: str = "max_num_batched_tokens"):
    """Returns a per-step token budget as a float, None for no budget, or
    raises ``ValueError`` unless it is a finite number >= 1."""
    if token_budget is None:
        return None
    value = _as_float(name, token_budget, "None or a number of tokens >= 1")
    if not np.isfinite(value) or value < 1:
        raise ValueError(f"`{name}` must be >= 1 token per step, got {token_budget!r}")
    return value


def check_accelerate_below(accelerate_below) -> float:
    """Validates ``accelerate_below`` (> 0, may be infinite); returns a float."""
    try:
        value = float(accelerate_below)
    except (TypeError, ValueError):
        raise ValueError(
            f"`accelerate_below` must be a number > 0, got {accelerate_below!r}"
        ) from None
    if not value > 0:
        raise ValueError(f"`accelerate_below` must be > 0, got {accelerate_below!r}")
    return value


def check_loop_settings(max_outer_iters, tol, damping_eta) -> tuple[int, float, float]:
    """Validates the MM loop settings; returns them as (int, float, float)."""
    if isinstance(max_outer_iters, bool) or not isinstance(
        max_outer_iters, (int, np.integer)
    ):
        raise ValueError(
            f"`max_outer_iters` must be a positive integer, got {max_outer_iters!r}"
        )
    if max_outer_iters <= 0:
        raise ValueError(f"`max_outer_iters` must be > 0, got {max_outer_iters!r}")
    tol_value = _as_float("tol", tol, "a number > 0")
    if not np.isfinite(tol_value) or tol_value <= 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}")
    eta = _as_float("damping_eta", damping_eta, "a number in (0, 1]")
    if not (0.0 < eta <= 1.0):
        raise ValueError(f"`damping_eta` must be in (0, 1], got {damping_eta!r}")
    return int(max_outer_iters), tol_value, eta


def _check_initialisation(
    fit, prepared: PreparedTrace, chunk: float, settings: dict[str, Any]
) -> None:
    """Raises where the baseline initialisation of the MM loop is not finite.

    The reference starts the loop from its baseline estimator, which raises on
    non-finite exposures or betas (e.g. step counts near the float64 range);
    the iterative estimators raise the same way instead of returning NaN
    betas. The exposures are recomputed only in that rare case, to name the
    offending rows.
    """
    init_beta = np.asarray(fit.init_beta, dtype=np.float64)
    if np.all(np.isfinite(init_beta)):
        return
    mode = settings["init_via_baseline_correction"]
    dtype = np.dtype(settings["dtype"])
    with precision_context(dtype):
        baseline = jax.device_get(
            fit_baseline_arrays(
                prepared.arrays,
                dtype.type(chunk),
                dtype.type(settings["min_duration_sec"]),
                correction_mode=mode,
            )
        )
    _, _, exposure_prefill, exposure_decode = _row_columns(baseline, prepared.n_phases)
    what = f"the baseline initialisation (init_via_baseline_correction={mode!r})"
    try:
        _check_finite_features(
            prepared, {"A_pf_i": exposure_prefill, "A_dec_i": exposure_decode}
        )
    except ValueError as error:
        raise ValueError(f"{what} failed: {error}") from None
    raise ValueError(f"{what} produced non-finite betas {init_beta.tolist()}")


def iterative_result(
    fit,
    prepared: PreparedTrace,
    chunk: float,
    settings: dict[str, Any],
    weight: np.ndarray | None = None,
) -> IterativeResult:
    """Converts a host copy of an :class:`IterativeFit` to the public record.

    ``weight`` ([n_pad] or [n]) are the fit's row weights, if any; they enter
    the standard errors and the condition number of the diagnostics.
    """
    n = prepared.n_phases
    m = int(fit.n_outer_iters)
    steps, duration, exposure_prefill, exposure_decode = _row_columns(fit, n)
    with np.errstate(over="ignore", invalid="ignore"):
        step_rate_hat = steps / duration
    _check_finite_features(
        prepared,
        {"N_i": steps, "T_i": duration, "lambda_hat_i": step_rate_hat},
    )
    _check_initialisation(fit, prepared, chunk, settings)
    beta = np.asarray(fit.beta, dtype=np.float64)
    init_beta = np.asarray(fit.init_beta, dtype=np.float64)
    history_beta = np.asarray(fit.history_beta[: m + 1], dtype=np.float64)
    history = {
        "beta": [tuple(float(v) for v in row) for row in history_beta],
        "delta_beta_l2": [float(v) for v in fit.history_delta[:m]],
        "r2": [float(v) for v in fit.history_r2[:m]],
        "rmse_seconds": [float(v) for v in fit.history_rmse[:m]],
        "lambda_floor_segments": [int(v) for v in fit.lambda_floor_segments[:m]],
    }
    history_stop = getattr(fit, "history_stop", None)
    if history_stop is not None:
        history["stop_measure"] = [float(v) for v in history_stop[:m]]
    stop_reason = stop_reason_name(int(fit.stop_code))
    converged = bool(fit.converged)
    design = np.stack([steps, exposure_prefill, exposure_decode], axis=1)
    cond = float(fit.stats.cond_scaled)
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float64)[:n]
    std_error = coefficient_std_errors(design, duration, beta, weight)
    notes = identifiability_warnings(beta, cond, design, std_error, weight)
    if stop_reason == "cycle":
        notes.append(
            "the MM loop ended in a period-2 cycle; the result is the last "
            "iterate, as in the reference (history shows both states)"
        )
    elif stop_reason == "max_iters":
        last = history.get("stop_measure", history["delta_beta_l2"])[-1]
        rule = settings.get("stop_rule", "absolute")
        notes.append(
            f"the MM loop hit max_outer_iters={m} without meeting tol "
            f"(last {rule} step {last:.3g})"
        )
    elif stop_reason == "non_finite":
        notes.append("an iterate became non-finite; the loop stopped there")
    diagnostics = {
        "converged": converged,
        "n_outer_iters": float(m),
        "tol": settings["tol"],
        "damping_eta": settings["damping_eta"],
        "init_beta0": float(init_beta[0]),
        "init_beta1": float(init_beta[1]),
        "init_beta2": float(init_beta[2]),
        "final_beta0": float(beta[0]),
        "final_beta1": float(beta[1]),
        "final_beta2": float(beta[2]),
        "final_r2": float(fit.stats.r2),
        "final_rmse_seconds": float(fit.stats.rmse_seconds),
        "final_delta_beta_l2": float(fit.history_delta[m - 1]) if m else np.nan,
        "mean_steps": float(steps.mean()),
        "mean_duration_seconds": float(duration.mean()),
        "n_phases": float(n),
        "stop_reason": stop_reason,
        "cond_scaled": cond,
        "beta_std_error": [float(v) for v in std_error],
        "warnings": notes,
    }
    _warn_rank_deficiency(notes)
    n_fallbacks = getattr(fit, "n_fallbacks", None)
    if n_fallbacks is not None:
        diagnostics["n_fallbacks"] = int(n_fallbacks)
    features = pd.DataFrame(
        {
            "N_i": steps,
            "T_i": duration,
            "exp_pf": exposure_prefill,
            "exp_dec": exposure_decode,
        },
        index=prepared.index,
    )
    return IterativeResult(
        beta0=float(beta[0]),
        beta1=float(beta[1]),
        beta2=float(beta[2]),
        converged=converged,
        n_outer_iters=m,
        stop_reason=stop_reason,
        diagnostics=diagnostics,
        history=history,
        features=features,
        chunk_size=chunk,
        settings=settings,
    )
