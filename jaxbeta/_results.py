"""Frozen result records returned by the public estimators.

The records hold plain Python floats, NumPy arrays and pandas objects: they
are what a user prints, stores and exports. The array-level fits return JAX
pytrees instead (see ``_baseline.BaselineFit`` and ``_iterative.IterativeFit``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BaselineResult", "IterativeResult", "StopReason"]


class StopReason:
    """Why the outer MM loop stopped (the values of ``stop_reason``)."""

    CONVERGED = "converged"
    """``||beta^(m) - beta^(m-1)||_2 < tol``."""
    MAX_ITERS = "max_iters"
    """Ran ``max_outer_iters`` iterations without meeting the tolerance."""
    CYCLE = "cycle"
    """Hit the iteration cap while alternating between two states (period 2)."""
    NON_FINITE = "non_finite"
    """An iterate became NaN or infinite; the loop stopped there."""

    ALL = (CONVERGED, MAX_ITERS, CYCLE, NON_FINITE)


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """Result of :func:`jaxbeta.estimate_betas_baseline`.

    Attributes:
      beta0: seconds per step.
      beta1: seconds per prefill token.
      beta2: seconds per decode token.
      diagnostics: SPEC section 6 keys (``n_phases``, ``r2``, ``rmse_seconds``,
        ``mean_duration_seconds``, ``mean_steps``, ``mean_A_pf_tokens``,
        ``mean_A_dec_tokens``) plus ``cond_scaled`` (condition number of the
        column-scaled NNLS design) and ``warnings`` (identifiability caveats).
      features: DataFrame in input row order with columns ``N_i`` (steps),
        ``T_i`` (seconds), ``A_pf_i`` and ``A_dec_i`` (tokens): the NNLS
        design and target.
      chunk_size: the chunk size C the fit used (tokens per step).
      settings: the estimator keywords the fit used.
    """

    beta0: float
    beta1: float
    beta2: float
    diagnostics: dict[str, Any]
    features: pd.DataFrame
    chunk_size: float = 0.0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    algo: str = "baseline"

    @property
    def beta(self) -> np.ndarray:
        """``[beta0, beta1, beta2]`` as a float64 array."""
        return np.array([self.beta0, self.beta1, self.beta2], dtype=np.float64)

    @property
    def stop_reason(self) -> str:
        """A closed-form fit always "converges"."""
        return StopReason.CONVERGED

    @property
    def converged(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class IterativeResult:
    """Result of :func:`jaxbeta.estimate_betas_iterative` and :func:`jaxbeta.fit`.

    Attributes:
      beta0, beta1, beta2: the estimate (seconds/step, seconds/token,
        seconds/token): the last iterate beta^(m) for the plain (Picard)
        iteration, T at the last accepted iterate for ``anderson``/``newton``.
      converged: whether the stop rule (``d < tol``) was met.
      n_outer_iters: outer iterations executed (MM map evaluations).
      stop_reason: one of :class:`StopReason` (``converged``, ``max_iters``,
        ``cycle``, ``non_finite``).
      diagnostics: SPEC section 7 keys (same names as the reference) plus
        ``stop_reason``, ``cond_scaled``, ``beta_std_error`` (least-squares
        standard errors, NaN for coefficients at 0), ``n_fallbacks``
        (rejected accelerated steps) and ``warnings``.
      history: dict with ``beta`` (list of (beta0, beta1, beta2) tuples,
        ``n_outer_iters + 1`` entries starting with the initialisation),
        ``delta_beta_l2``, ``stop_measure`` (the stop rule's measure), ``r2``
        and ``rmse_seconds`` (one per iteration).
      features: DataFrame in input row order: ``N_i``, ``T_i`` and the last
        iteration's ``exp_pf``/``exp_dec`` (= N_i * pbar_pf_i, N_i * pbar_dec_i).
    """

    beta0: float
    beta1: float
    beta2: float
    converged: bool
    n_outer_iters: int
    stop_reason: str
    diagnostics: dict[str, Any]
    history: dict[str, list]
    features: pd.DataFrame
    chunk_size: float = 0.0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    algo: str = "iterative"  # "recommended" for jaxbeta.fit

    @property
    def beta(self) -> np.ndarray:
        """``[beta0, beta1, beta2]`` as a float64 array."""
        return np.array([self.beta0, self.beta1, self.beta2], dtype=np.float64)
