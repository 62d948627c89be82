"""jaxbeta: step-level execution coefficients of LLM inference engines from
request-level traces, in JAX.

Public API (see README.md):

- estimators: :func:`estimate_betas_baseline`, :func:`estimate_betas_iterative`
  (drop-ins for the reference's entry points) and :func:`fit` (the
  recommended estimator, see the README);
- array level: :func:`prepare_trace`, :func:`fit_baseline_arrays`,
  :func:`fit_iterative_arrays` (pure, jit-ed, vmap-able);
- many traces: :func:`fit_many`, :func:`sweep`, :func:`best_chunk_size`;
- gradients: :func:`sensitivity`, :func:`boundary_sensitivity`,
  :func:`top_influences`, :func:`bootstrap`;
- data: :func:`read_trace`, :func:`simulate`, exports to JSON/YAML/BLIS.
"""

from jaxbeta._api import estimate_betas_baseline, estimate_betas_iterative
from jaxbeta._arrays import PhaseArrays
from jaxbeta._baseline import BaselineFit, fit_baseline_arrays
from jaxbeta._batch import ChunkSizeChoice, best_chunk_size, fit_many, sweep
from jaxbeta._boundary import ColumnNames, PreparedTrace, bucket_size, prepare_trace
from jaxbeta._export import (
    blis_cli_args,
    to_blis,
    to_record,
    write_blis,
    write_json,
    write_yaml,
)
from jaxbeta._io import read_trace, write_otlp_spans
from jaxbeta._iterative import IterativeFit, fit_iterative_arrays
from jaxbeta._plot import plot_fit
from jaxbeta._precision import float64
from jaxbeta._recommended import fit
from jaxbeta._results import BaselineResult, IterativeResult, StopReason
from jaxbeta._sensitivity import (
    BootstrapResult,
    bootstrap,
    boundary_sensitivity,
    sensitivity,
    top_influences,
)
from jaxbeta._simulate import SimulationResult, simulate

__version__ = "0.1.0"

__all__ = [
    "BaselineFit",
    "BaselineResult",
    "BootstrapResult",
    "ChunkSizeChoice",
    "ColumnNames",
    "IterativeFit",
    "IterativeResult",
    "PhaseArrays",
    "PreparedTrace",
    "SimulationResult",
    "StopReason",
    "__version__",
    "best_chunk_size",
    "blis_cli_args",
    "bootstrap",
    "boundary_sensitivity",
    "bucket_size",
    "estimate_betas_baseline",
    "estimate_betas_iterative",
    "fit",
    "fit_baseline_arrays",
    "fit_many",
    "fit_iterative_arrays",
    "float64",
    "plot_fit",
    "prepare_trace",
    "read_trace",
    "sensitivity",
    "simulate",
    "sweep",
    "to_blis",
    "to_record",
    "top_influences",
    "write_blis",
    "write_json",
    "write_otlp_spans",
    "write_yaml",
]
