"""How much each phase moves the fitted betas, and how uncertain they are.

Host-side entry points over the array-level derivatives of ``_implicit``:

- :func:`sensitivity`: per phase, d beta_j / d t_start, d t_end, d weight and
  d tokens, in input row order;
- :func:`boundary_sensitivity`: per distinct timestamp, d beta_j / dt for
  moving every phase boundary at that timestamp together (well defined at
  ties, unlike the per-phase view);
- :func:`top_influences`: the phases that move one beta most;
- :func:`bootstrap`: percentile intervals from resampling whole requests,
  every resample in one vmapped fit.

All of it runs in float64 (inside ``jax.enable_x64``, never touching the
global flag).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from jaxbeta._api import (
    COND_WARN,
    check_loop_settings,
    check_mode,
    estimate_betas_baseline,
    estimate_betas_iterative,
)
from jaxbeta._baseline import fit_baseline_arrays
from jaxbeta._boundary import (
    PreparedTrace,
    check_chunk_size,
    check_min_duration,
    columns_from_kwargs,
    load_table,
    prepare_trace,
)
from jaxbeta._correction import TRACE_ONLY_MODES
from jaxbeta._implicit import (
    ADJOINT_MAX_ITERS,
    ADJOINT_TOL,
    baseline_sensitivity_arrays,
    iterative_sensitivity_arrays,
)
from jaxbeta._iterative import (
    INIT_MODES,
    ITERATIVE_MODES,
    fit_iterative_arrays,
    stop_reason_name,
)
from jaxbeta._precision import precision_context
from jaxbeta._robust import check_huber_scale, check_loss

__all__ = [
    "BootstrapResult",
    "bootstrap",
    "boundary_sensitivity",
    "sensitivity",
    "top_influences",
]

ALGOS = ("baseline", "iterative")
INPUTS = ("t_start", "t_end", "weight", "tokens")
BETAS = ("beta0", "beta1", "beta2")

# Device memory one resample needs per padded phase row, bytes: XLA's
# memory analysis of the vmapped fits gave ~310 (iterative) and ~30
# (baseline) at 4096 rows; these allow for about 1.6x more.
BYTES_PER_ROW = {"iterative": 512, "baseline": 64}
MAX_CHUNK_BYTES = 2e9


def derivative_column(beta: int, name: str) -> str:
    """Column name of d beta_j / d ``name`` (``dbeta1_dt_end``)."""
    return f"dbeta{beta}_d{name}"


# ---------------------------------------------------------------------------
# options


_OWN_OPTIONS = {
    "baseline": {
        "min_duration_sec",
        "correction_mode",
        "dtype",
        "loss",
        "huber_scale",
    },
    "iterative": {
        "min_duration_sec",
        "prefill_correction_mode",
        "max_outer_iters",
        "tol",
        "damping_eta",
        "init_via_baseline_correction",
        "dtype",
        "loss",
        "huber_scale",
    },
}


def _resolve_options(algo: str, options: dict[str, Any]) -> dict[str, Any]:
    """The estimator's keywords with their defaults, ``options`` applied and
    checked as the estimator checks them."""
    check_mode("algo", algo, ALGOS)
    estimator = (
        estimate_betas_baseline if algo == "baseline" else estimate_betas_iterative
    )
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(estimator).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "chunk_size"
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for algo={algo!r}; the options are "
            f"{sorted(defaults)}"
        )
    merged = {**defaults, **options}
    handled = _OWN_OPTIONS[algo] | {n for n in defaults if n.endswith("_col")}
    unsupported = [
        name
        for name in options
        if name not in handled and options[name] != defaults[name]
    ]
    if unsupported:
        raise ValueError(
            f"option(s) {unsupported} of the {algo} estimator are not supported "
            "here yet; leave them at their defaults"
        )
    if np.dtype(merged["dtype"]) != np.float64:
        raise ValueError(
            f"derivatives and resamples are computed in float64; got "
            f"`dtype`={merged['dtype']!r}"
        )
    merged["min_duration_sec"] = check_min_duration(merged["min_duration_sec"])
    check_loss(merged["loss"])
    merged["huber_scale"] = check_huber_scale(merged["huber_scale"])
    if algo == "baseline":
        check_mode("correction_mode", merged["correction_mode"], TRACE_ONLY_MODES)
    else:
        check_mode(
            "prefill_correction_mode",
            merged["prefill_correction_mode"],
            ITERATIVE_MODES,
        )
        check_mode(
            "init_via_baseline_correction",
            merged["init_via_baseline_correction"],
            INIT_MODES,
        )
        iters, tol, eta = check_loop_settings(
            merged["max_outer_iters"], merged["tol"], merged["damping_eta"]
        )
        merged.update(max_outer_iters=iters, tol=tol, damping_eta=eta)
    return merged


def _settings_record(algo: str, options: dict[str, Any]) -> dict[str, Any]:
    return {name: options[name] for name in sorted(_OWN_OPTIONS[algo])}


def _float(value):
    return None if value is None else np.float64(value)


# ---------------------------------------------------------------------------
# sensitivity


def sensitivity(
    phases: pd.DataFrame | str,
    *,
    chunk_size: float,
    algo: str = "iterative",
    adjoint_tol: float = ADJOINT_TOL,
    adjoint_max_iters: int = ADJOINT_MAX_ITERS,
    **options: Any,
) -> pd.DataFrame:
    """Derivatives of the fitted betas with respect to every phase.

    For each phase i (input row order) and each coefficient j:

    - ``dbeta{j}_dt_start``, ``dbeta{j}_dt_end``: units of beta_j per second
      of moving that boundary alone, every other timestamp fixed;
    - ``dbeta{j}_dweight``: change of beta_j per unit of the phase's weight in
      the least-squares objective, at all weights 1. Dropping the phase
      changes beta_j by about ``-dbeta{j}_dweight`` (first order), so this is
      the phase's influence on the fit;
    - ``dbeta{j}_dtokens``: per token of the phase's count (P_r on prefill
      rows, D_r on decode rows), treated as a real number. Step counts
      ``ceil(P_r / C)`` are piecewise constant, so only decode step counts
      and the partial-chunk correction carry this derivative.

    The iterative estimator is differentiated at its fixed point (implicit
    function theorem; ``jaxbeta._implicit``). When its loop did not converge
    (iteration cap or a period-2 cycle) the returned iterate is no fixed
    point and the derivatives are only indicative: then ``gradient_valid``
    is False, a ``UserWarning`` says why, and ``stop_reason`` tells how the
    loop ended. The baseline's derivatives are flagged the same way when its
    design is nearly rank-deficient.

    With ``loss="huber"`` and the automatic scale, ``dbeta{j}_dweight``
    holds the scale (a weighted median, piecewise constant in the weights)
    fixed; pass ``huber_scale`` for weight derivatives of a fixed objective.

    Ties: a timestamp shared by several boundaries (step-aligned traces) is
    a kink of the fit. The per-phase derivative there is the one of the
    smooth piece that the host's tie order selects: the one-sided derivative
    for a boundary sorted first (moving earlier) or last (moving later) in
    its group, and no real perturbation's derivative for one in between. Use
    :func:`boundary_sensitivity` for the well-defined derivative of moving a
    shared timestamp as a whole.

    Args:
      phases: one row per phase (DataFrame, or a CSV/Parquet path).
      chunk_size: C, prefill tokens per step.
      algo: ``iterative`` (default) or ``baseline``.
      adjoint_tol: relative residual asked of each implicit linear solve.
      adjoint_max_iters: cap on operator products per linear solve.
      **options: the keywords of :func:`jaxbeta.estimate_betas_iterative` or
        :func:`jaxbeta.estimate_betas_baseline` (column names, correction
        modes, loop settings, ``loss``, ``huber_scale``); ``dtype`` must be
        float64.

    Returns:
      A DataFrame with the input's index and columns ``request_id``,
      ``phase_type``, ``t_start``, ``t_end`` (as given), then
      ``dbeta{j}_dt_start``, ``dbeta{j}_dt_end``, ``dbeta{j}_dweight`` and
      ``dbeta{j}_dtokens`` for j = 0, 1, 2. ``frame.attrs`` holds ``algo``,
      ``beta`` (the fit, [3]), ``gradient_valid``, ``stop_reason``,
      ``n_outer_iters``, ``adjoint_residual`` and ``adjoint_products`` (per
      beta; iterative only), ``chunk_size``, ``settings`` and ``warnings``.

    Raises:
      ValueError: invalid parameters or rows (as the estimators raise).
      TypeError: an unknown option.
    """
    chunk = check_chunk_size(chunk_size)
    settings = _resolve_options(algo, options)
    table = load_table(phases)
    columns = columns_from_kwargs(settings)
    prepared = prepare_trace(table, columns=columns, dtype=np.float64)
    notes: list[str] = []
    with precision_context(np.float64):
        if algo == "baseline":
            fit, jacobian = baseline_sensitivity_arrays(
                prepared.arrays,
                np.float64(chunk),
                np.float64(settings["min_duration_sec"]),
                correction_mode=settings["correction_mode"],
                loss=settings["loss"],
                huber_scale=_float(settings["huber_scale"]),
            )
            fit, jacobian = jax.device_get((fit, jacobian))
            cond = float(fit.stats.cond_scaled)
            valid = bool(np.isfinite(cond) and cond <= COND_WARN)
            if not valid:
                notes.append(
                    f"the NNLS design is nearly rank-deficient (scaled condition "
                    f"number {cond:.3g}): the betas, and so their derivatives, "
                    "are not uniquely determined"
                )
            report = {"stop_reason": "converged", "n_outer_iters": 0}
        else:
            result = iterative_sensitivity_arrays(
                prepared.arrays,
                np.float64(chunk),
                np.float64(settings["min_duration_sec"]),
                prefill_correction_mode=settings["prefill_correction_mode"],
                max_outer_iters=settings["max_outer_iters"],
                tol=np.float64(settings["tol"]),
                damping_eta=np.float64(settings["damping_eta"]),
                init_via_baseline_correction=settings["init_via_baseline_correction"],
                loss=settings["loss"],
                huber_scale=_float(settings["huber_scale"]),
                adjoint_tol=np.float64(adjoint_tol),
                adjoint_max_iters=int(adjoint_max_iters),
            )
            result = jax.device_get(result)
            fit, jacobian = result.fit, result.jacobian
            stop_reason = stop_reason_name(int(fit.stop_code))
            solved = bool(np.all(result.adjoint.solved))
            valid = stop_reason == "converged" and solved
            if stop_reason != "converged":
                notes.append(
                    f"the MM loop stopped with stop_reason={stop_reason!r} after "
                    f"{int(fit.n_outer_iters)} iterations: the iterate is not a "
                    "fixed point, so these are derivatives of a fixed point the "
                    "loop did not reach, taken at a point that is not one"
                )
            if not solved:
                residual = np.asarray(result.adjoint.residual)
                notes.append(
                    f"the implicit linear solves stopped at relative residuals "
                    f"{residual.tolist()} (asked {adjoint_tol:g}); raise "
                    "adjoint_max_iters"
                )
            report = {
                "stop_reason": stop_reason,
                "n_outer_iters": int(fit.n_outer_iters),
                "adjoint_residual": np.asarray(result.adjoint.residual).tolist(),
                "adjoint_products": np.asarray(
                    result.adjoint.operator_products
                ).tolist(),
            }
    frame = _sensitivity_table(table, prepared, columns, jacobian)
    frame.attrs.update(
        algo=algo,
        beta=np.asarray(fit.beta, dtype=np.float64).tolist(),
        gradient_valid=valid,
        chunk_size=chunk,
        settings=_settings_record(algo, settings),
        warnings=notes,
        **report,
    )
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return frame


def _sensitivity_table(
    table: pd.DataFrame, prepared: PreparedTrace, columns, jacobian
) -> pd.DataFrame:
    n = prepared.n_phases
    # ``.array`` keeps the columns' own storage (e.g. Arrow strings): a round
    # trip through NumPy objects cost more than the rest of the table.
    data: dict[str, Any] = {
        "request_id": table[columns.request_id].array,
        "phase_type": table[columns.phase_type].array,
        "t_start": pd.to_numeric(table[columns.t_start]).to_numpy(np.float64),
        "t_end": pd.to_numeric(table[columns.t_end]).to_numpy(np.float64),
    }
    for name in INPUTS:
        rows = np.asarray(getattr(jacobian, name), dtype=np.float64)[:, :n]
        for j in range(3):
            data[derivative_column(j, name)] = rows[j]
    return pd.DataFrame(data, index=prepared.index)


def boundary_sensitivity(sens: pd.DataFrame) -> pd.DataFrame:
    """Derivatives with respect to each distinct timestamp moved as a whole.

    Moving every phase boundary that sits at one timestamp together keeps
    every order in the grid, so unlike the per-phase derivatives this one is
    well defined at ties: it is the sum of the per-boundary derivatives of
    all starts and ends at that timestamp.

    Args:
      sens: a table from :func:`sensitivity`.

    Returns:
      A DataFrame indexed by ``timestamp`` (ascending, the input's units),
      with ``n_boundaries`` (phase starts and ends at that time) and
      ``dbeta0_dt``, ``dbeta1_dt``, ``dbeta2_dt`` (units of beta per second).
      ``attrs`` are copied from ``sens``.
    """
    times = np.concatenate([sens["t_start"].to_numpy(), sens["t_end"].to_numpy()])
    data = {"timestamp": times, "n_boundaries": np.ones(times.shape[0], np.int64)}
    for j in range(3):
        data[f"dbeta{j}_dt"] = np.concatenate(
            [
                sens[derivative_column(j, "t_start")].to_numpy(),
                sens[derivative_column(j, "t_end")].to_numpy(),
            ]
        )
    grouped = pd.DataFrame(data).groupby("timestamp", sort=True).sum()
    grouped.attrs.update(sens.attrs)
    return grouped


def top_influences(
    sens: pd.DataFrame, beta: str | int = "beta1", by: str = "weight", k: int = 10
) -> pd.DataFrame:
    """The ``k`` phases whose ``by`` moves ``beta`` most, largest first.

    Args:
      sens: a table from :func:`sensitivity`.
      beta: ``beta0``, ``beta1``, ``beta2`` (or 0, 1, 2).
      by: ``weight`` (default: influence in the fit), ``t_start``, ``t_end``
        or ``tokens``.
      k: how many phases.

    Returns:
      Rows of ``sens`` (``request_id``, ``phase_type``, ``t_start``,
      ``t_end`` and the derivative column) sorted by decreasing absolute
      derivative, with ``rank`` (1 = largest) and ``share`` (the absolute
      derivative over the sum of all phases' absolute derivatives).
    """
    index = BETAS.index(beta) if isinstance(beta, str) and beta in BETAS else beta
    if index not in (0, 1, 2):
        raise ValueError(
            f"`beta` must be one of {list(BETAS)} or 0, 1, 2; got {beta!r}"
        )
    check_mode("by", by, INPUTS)
    column = derivative_column(index, by)
    magnitude = sens[column].abs()
    total = float(magnitude.sum())
    order = magnitude.sort_values(ascending=False, kind="stable").index[: int(k)]
    top = sens.loc[order, ["request_id", "phase_type", "t_start", "t_end", column]]
    top = top.copy()
    top.insert(0, "rank", np.arange(1, len(top) + 1))
    top["share"] = magnitude.loc[order] / total if total > 0 else np.nan
    return top


# ---------------------------------------------------------------------------
# bootstrap


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Result of :func:`bootstrap`.

    Attributes:
      intervals: DataFrame indexed by ``beta0``, ``beta1``, ``beta2`` with the
        full-trace estimate ``beta`` and the percentile interval ``low``,
        ``high`` (seconds/step, seconds/token).
      betas: [n_resamples, 3] the betas of every resample.
      converged: [n_resamples] bool, the resample's fit converged (always
        True for the baseline).
      converged_share: fraction of resamples that converged.
      confidence: the interval's nominal coverage.
      seed: the seed of ``numpy.random.default_rng`` used.
    """

    intervals: pd.DataFrame
    betas: np.ndarray
    converged: np.ndarray
    converged_share: float
    confidence: float
    seed: int


@functools.lru_cache(maxsize=32)
def _resample_fitter(algo: str, static: tuple):
    """A jitted fit vmapped over row weights, cached per static settings."""
    static_options = dict(static)

    def fit_one(arrays, weight, dynamic):
        if algo == "baseline":
            fit = fit_baseline_arrays(
                arrays, weight=weight, **dynamic, **static_options
            )
            return fit.beta, jnp.all(jnp.isfinite(fit.beta))
        fit = fit_iterative_arrays(arrays, weight=weight, **dynamic, **static_options)
        return fit.beta, fit.converged

    return jax.jit(jax.vmap(fit_one, in_axes=(None, 0, None)))


def bootstrap(
    phases: pd.DataFrame | str,
    *,
    chunk_size: float,
    n_resamples: int = 1000,
    seed: int = 0,
    algo: str = "iterative",
    confidence: float = 0.95,
    progress: bool = True,
    **options: Any,
) -> BootstrapResult:
    """Percentile bootstrap intervals for the betas, resampling requests.

    Each resample draws as many requests as the trace has, with replacement,
    as multinomial counts; a request drawn c times enters the least-squares
    objective with weight c on both its phases (0 leaves it out). The time
    grid and the concurrency every phase saw stay those of the full trace:
    only which phases are *fitted* is resampled. All resamples run as one
    vmapped fit, in chunks of at most about 2 GB of device memory, with a
    progress bar over chunks.

    Args:
      phases: one row per phase (DataFrame, or a CSV/Parquet path).
      chunk_size: C, prefill tokens per step.
      n_resamples: number of resamples (>= 2).
      seed: seed of ``numpy.random.default_rng``.
      algo: ``iterative`` (default) or ``baseline``.
      confidence: coverage of the percentile interval, in (0, 1).
      progress: show the tqdm bar.
      **options: the estimator's keywords, as for :func:`sensitivity`.

    Returns:
      A :class:`BootstrapResult`. The intervals use the resamples whose betas
      are finite, converged or not; ``converged_share`` says how many
      converged.
    """
    chunk = check_chunk_size(chunk_size)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer):
        raise ValueError(f"`n_resamples` must be an integer >= 2, got {n_resamples!r}")
    if n_resamples < 2:
        raise ValueError(f"`n_resamples` must be >= 2, got {n_resamples!r}")
    if not (0.0 < float(confidence) < 1.0):
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}")
    settings = _resolve_options(algo, options)
    table = load_table(phases)
    columns = columns_from_kwargs(settings)
    prepared = prepare_trace(table, columns=columns, dtype=np.float64)
    n, n_pad = prepared.n_phases, prepared.arrays.n_rows
    codes, uniques = pd.factorize(table[columns.request_id])
    n_requests = len(uniques)

    if algo == "baseline":
        static = (("correction_mode", settings["correction_mode"]),)
        dynamic = {}
    else:
        static = (
            ("prefill_correction_mode", settings["prefill_correction_mode"]),
            ("max_outer_iters", settings["max_outer_iters"]),
            ("init_via_baseline_correction", settings["init_via_baseline_correction"]),
        )
        dynamic = {
            "tol": np.float64(settings["tol"]),
            "damping_eta": np.float64(settings["damping_eta"]),
        }
    static = static + (("loss", settings["loss"]),)
    dynamic.update(
        chunk_size=np.float64(chunk),
        min_duration_sec=np.float64(settings["min_duration_sec"]),
        huber_scale=_float(settings["huber_scale"]),
    )
    fitter = _resample_fitter(algo, static)

    # One extra row of weights 1 (the full trace) rides along in the first
    # chunk, so the point estimate needs no program of its own.
    total = n_resamples + 1
    per_resample = BYTES_PER_ROW[algo] * n_pad
    batch = int(max(1, min(total, MAX_CHUNK_BYTES // per_resample)))
    n_chunks = math.ceil(total / batch)
    rng = np.random.default_rng(seed)
    probabilities = np.full(n_requests, 1.0 / n_requests)
    betas = np.empty((total, 3))
    converged = np.empty(total, dtype=bool)
    done = 0
    with precision_context(np.float64):
        for _ in tqdm(
            range(n_chunks), desc="bootstrap", unit="chunk", disable=not progress
        ):
            size = min(batch, total - done)
            weights = np.ones((batch, n_pad))  # unused rows keep weight 1
            first = 1 if done == 0 else 0
            counts = rng.multinomial(n_requests, probabilities, size=size - first)
            weights[first:size, :n] = counts[:, codes]
            weights[:, n:] = 0.0
            chunk_betas, chunk_converged = jax.device_get(
                fitter(prepared.arrays, weights, dynamic)
            )
            betas[done : done + size] = chunk_betas[:size]
            converged[done : done + size] = chunk_converged[:size]
            done += size

    full, betas, converged = betas[0], betas[1:], converged[1:]
    finite = np.all(np.isfinite(betas), axis=1)
    tail = 50.0 * (1.0 - float(confidence))
    low, high = np.percentile(betas[finite], [tail, 100.0 - tail], axis=0)
    intervals = pd.DataFrame(
        {"beta": full, "low": low, "high": high}, index=pd.Index(BETAS, name="name")
    )
    return BootstrapResult(
        intervals=intervals,
        betas=betas,
        converged=converged,
        converged_share=float(np.mean(converged)),
        confidence=float(confidence),
        seed=int(seed),
    )
