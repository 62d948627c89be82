"""jaxbeta: step-level execution coefficients of LLM inference engines from
request-level traces, in JAX."""

from jaxbeta._api import estimate_betas_baseline, estimate_betas_iterative
from jaxbeta._precision import float64
from jaxbeta._results import BaselineResult, IterativeResult, StopReason

__version__ = "0.1.0"

__all__ = [
    "BaselineResult",
    "IterativeResult",
    "StopReason",
    "__version__",
    "estimate_betas_baseline",
    "estimate_betas_iterative",
    "float64",
]
