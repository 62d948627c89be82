"""Diagnostic plots of a fit (matplotlib, imported only when plotting)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["phase_concurrency", "plot_fit", "predicted_durations"]

_COLOURS = {"prefill": "tab:blue", "decode": "tab:orange"}


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "jaxbeta plotting needs matplotlib: pip install 'jaxbeta[plot]'"
        ) from err
    return Figure


def predicted_durations(result: Any) -> tuple[np.ndarray, np.ndarray]:
    """Observed and model-predicted phase durations from ``result.features``.

    The prediction is ``N_i*beta0 + A_pf_i*beta1 + A_dec_i*beta2`` (baseline
    features) or ``N_i*beta0 + exp_pf*beta1 + exp_dec*beta2`` (iterative
    features: the last iteration's exposures).

    Args:
      result: a fit result whose ``features`` hold ``N_i`` (steps), ``T_i``
        (seconds) and either ``A_pf_i``/``A_dec_i`` or ``exp_pf``/``exp_dec``
        (tokens).

    Returns:
      ``(observed, predicted)``, both in seconds, in feature row order.

    Raises:
      ValueError: the features lack the needed columns.
    """
    features = result.features
    if {"A_pf_i", "A_dec_i"} <= set(features.columns):
        pf, dec = "A_pf_i", "A_dec_i"
    else:
        pf, dec = "exp_pf", "exp_dec"
    missing = [c for c in ("N_i", "T_i", pf, dec) if c not in features.columns]
    if missing:
        raise ValueError(
            f"result.features lacks column(s) {missing}; expected N_i, T_i and "
            f"A_pf_i/A_dec_i (baseline) or exp_pf/exp_dec (iterative)"
        )
    design = features[["N_i", pf, dec]].to_numpy(dtype=np.float64)
    predicted = design @ np.asarray(
        [result.beta0, result.beta1, result.beta2], dtype=np.float64
    )
    return features["T_i"].to_numpy(dtype=np.float64), predicted


def phase_concurrency(
    phases: pd.DataFrame,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number of active prefill and decode phases over time.

    A phase is active on ``[t_start, t_end)``. The grid is the sorted distinct
    starts and ends (SPEC section 4); counts come from sorted event sweeps
    (``searchsorted`` on the sorted starts and ends), with no loop over rows.

    Args:
      phases: phase table with ``phase_type``, ``t_start`` and ``t_end``
        (seconds).

    Returns:
      ``(edges, n_prefill, n_decode)``: ``edges`` are the M grid points in
      seconds; ``n_prefill[j]`` and ``n_decode[j]`` count the phases of each
      type active on ``[edges[j], edges[j+1])`` (length M - 1, int64).
    """
    t_start = phases["t_start"].to_numpy(dtype=np.float64)
    t_end = phases["t_end"].to_numpy(dtype=np.float64)
    kind = phases["phase_type"].astype(str).str.strip().str.lower().to_numpy()
    edges = np.unique(np.concatenate([t_start, t_end]))
    left = edges[:-1]

    def active(mask: np.ndarray) -> np.ndarray:
        started = np.searchsorted(np.sort(t_start[mask]), left, side="right")
        ended = np.searchsorted(np.sort(t_end[mask]), left, side="right")
        return (started - ended).astype(np.int64)

    return edges, active(kind == "prefill"), active(kind == "decode")


def plot_fit(
    result: Any,
    phases: pd.DataFrame | None = None,
    *,
    path: str | os.PathLike | None = None,
):
    """Plot how well a fit explains its phases.

    Panels: (a) observed against predicted phase duration (seconds), with
    the identity line; (b) when ``phases`` is given, the number of active
    prefill and decode phases over time, above the phase intervals (one line
    per request, coloured by type); (c) for iterative results, each beta
    over the outer iterations, in microseconds (per step / per prefill token
    / per decode token).

    The figure is a :class:`matplotlib.figure.Figure` built without pyplot,
    so it needs no display and leaves pyplot's state alone; notebooks show it
    when it is the cell's value.

    Args:
      result: a :class:`~jaxbeta.BaselineResult` or
        :class:`~jaxbeta.IterativeResult`.
      phases: the phase table the fit used (optional), in the same row order
        as ``result.features``; times in seconds (shown relative to the first
        event).
      path: when given, the figure is saved there (PNG unless the extension
        names another format matplotlib knows).

    Returns:
      The figure.

    Raises:
      ImportError: matplotlib is not installed (the ``plot`` extra).
      ValueError: ``result.features`` lacks the needed columns.
    """
    figure_cls = _matplotlib()
    observed, predicted = predicted_durations(result)
    beta_history = _beta_history(result)

    has_time = phases is not None and len(phases) > 0
    n_rows = 1 + (beta_history is not None)
    fig = figure_cls(figsize=(13.0 if has_time else 6.0, 4.6 * n_rows))
    grid = fig.add_gridspec(n_rows, 3 if has_time else 1, hspace=0.45, wspace=0.3)

    ax_fit = fig.add_subplot(grid[0, 0])
    kinds = None
    if phases is not None and len(phases) == len(observed):
        kinds = phases["phase_type"].astype(str).str.strip().str.lower().to_numpy()
    _draw_fit(ax_fit, observed, predicted, kinds, result)

    if has_time:
        inner = grid[0, 1:].subgridspec(2, 1, height_ratios=(1, 1.3), hspace=0.08)
        ax_conc = fig.add_subplot(inner[0])
        ax_span = fig.add_subplot(inner[1], sharex=ax_conc)
        _draw_concurrency(ax_conc, ax_span, phases)

    if beta_history is not None:
        sub = grid[1, :].subgridspec(1, 3, wspace=0.35)
        from matplotlib.ticker import MaxNLocator

        labels = (
            "(c) beta0 (µs/step)",
            "beta1 (µs/prefill token)",
            "beta2 (µs/decode token)",
        )
        iters = np.arange(beta_history.shape[0])
        for k in range(3):
            ax = fig.add_subplot(sub[k])
            ax.plot(iters, beta_history[:, k] * 1e6, marker="o", ms=3)
            ax.set_xlabel("outer iteration (0 = initialisation)")
            ax.set_title(labels[k], fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)

    fig.suptitle(_title(result), fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _beta_history(result: Any) -> np.ndarray | None:
    history = getattr(result, "history", None)
    if not history or "beta" not in history or len(history["beta"]) == 0:
        return None
    betas = np.asarray(history["beta"], dtype=np.float64)
    if betas.ndim != 2 or betas.shape[1] != 3:
        raise ValueError(
            f"result.history['beta'] must be a list of (beta0, beta1, beta2), "
            f"got shape {betas.shape}"
        )
    return betas


def _title(result: Any) -> str:
    betas = ", ".join(
        f"{name}={value:.4g}"
        for name, value in zip(
            ("beta0", "beta1", "beta2"),
            (result.beta0, result.beta1, result.beta2),
            strict=True,
        )
    )
    algo = getattr(result, "algo", "fit")
    return f"jaxbeta {algo} fit: {betas} (seconds)"


def _draw_fit(ax, observed, predicted, kinds, result) -> None:
    if kinds is None:
        ax.scatter(observed, predicted, s=12, alpha=0.7, color="tab:gray")
    else:
        for kind, colour in _COLOURS.items():
            mask = kinds == kind
            ax.scatter(
                observed[mask],
                predicted[mask],
                s=12,
                alpha=0.7,
                color=colour,
                label=kind,
            )
        ax.legend(loc="best", fontsize=8)
    finite = np.concatenate([observed, predicted])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
    diagnostics = getattr(result, "diagnostics", {}) or {}
    r2 = diagnostics.get("r2", diagnostics.get("final_r2"))
    title = "(a) observed vs predicted duration"
    if r2 is not None and np.isfinite(r2):
        title += f", R² = {r2:.4f}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("observed T_i (s)")
    ax.set_ylabel("predicted (s)")
    ax.grid(alpha=0.3)


def _draw_concurrency(ax_conc, ax_span, phases: pd.DataFrame) -> None:
    edges, n_pf, n_dec = phase_concurrency(phases)
    origin = edges[0]
    rel = edges - origin
    if len(rel) > 1:
        ax_conc.stairs(n_pf, rel, color=_COLOURS["prefill"], label="prefill")
        ax_conc.stairs(n_dec, rel, color=_COLOURS["decode"], label="decode")
    ax_conc.set_ylabel("active phases")
    ax_conc.set_title("(b) concurrency and phase intervals", fontsize=10)
    ax_conc.legend(loc="upper right", fontsize=8)
    ax_conc.grid(alpha=0.3)
    ax_conc.tick_params(labelbottom=False)

    lane, _ = pd.factorize(phases["request_id"])
    kinds = phases["phase_type"].astype(str).str.strip().str.lower().to_numpy()
    t_start = phases["t_start"].to_numpy(dtype=np.float64) - origin
    t_end = phases["t_end"].to_numpy(dtype=np.float64) - origin
    for kind, colour in _COLOURS.items():
        mask = kinds == kind
        ax_span.hlines(lane[mask], t_start[mask], t_end[mask], color=colour, lw=1.5)
    ax_span.set_ylabel("request")
    ax_span.set_xlabel(f"time since first event (s; origin {origin:.6f} s)")
    ax_span.invert_yaxis()
    ax_span.grid(alpha=0.3, axis="x")
