"""Exports of fit results: a canonical JSON/YAML record and BLIS coefficients.

The canonical record (:func:`to_record`) is what jaxbeta writes for a fit:
plain JSON types only (NaN and infinities become ``null``), betas in seconds.

BLIS (the blackbox inference simulator, ``inference-sim``) models a step as
``beta0 + beta1 * prefill_tokens + beta2 * decode_tokens`` in
**microseconds**; :func:`to_blis` converts jaxbeta's seconds to that unit.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "blis_cli_args",
    "input_fingerprint",
    "to_blis",
    "to_record",
    "write_blis",
    "write_json",
    "write_yaml",
]

UNITS = {
    "beta0": "s/step",
    "beta1": "s/prefill_token",
    "beta2": "s/decode_token",
    "chunk_size": "prefill_tokens/step",
}
"""Units of the record's ``beta`` entries and ``chunk_size``."""

_FINGERPRINT_COLUMNS = (
    "request_id",
    "phase_type",
    "t_start",
    "t_end",
    "prefill_tokens",
    "decode_tokens",
)
_US_PER_S = 1e6


def to_record(result: Any, *, phases: pd.DataFrame | None = None) -> dict[str, Any]:
    """Build the canonical, JSON-serialisable record of a fit.

    Args:
      result: a :class:`~jaxbeta.BaselineResult` or
        :class:`~jaxbeta.IterativeResult` (anything with ``beta0..2``,
        ``algo``, ``chunk_size``, ``settings`` and ``diagnostics``).
      phases: the phase table the fit used; when given, its
        :func:`input_fingerprint` is recorded so that a record can be tied to
        its input.

    Returns:
      A dict with keys ``jaxbeta_version``, ``algo``, ``beta`` (``beta0``
      s/step, ``beta1`` s/prefill token, ``beta2`` s/decode token),
      ``units``, ``chunk_size`` (tokens/step), ``settings``, ``diagnostics``,
      ``stop_reason``, ``converged``, ``input_fingerprint`` (``None`` without
      ``phases``) and, for iterative results, ``n_outer_iters`` and
      ``history``. Values are plain JSON types; NaN and infinities are
      ``None``.
    """
    import jaxbeta  # lazily: jaxbeta/__init__ re-exports this module

    record: dict[str, Any] = {
        "jaxbeta_version": jaxbeta.__version__,
        "algo": str(result.algo),
        "beta": {
            "beta0": _json_value(result.beta0),
            "beta1": _json_value(result.beta1),
            "beta2": _json_value(result.beta2),
        },
        "units": dict(UNITS),
        "chunk_size": _json_value(result.chunk_size),
        "settings": _json_value(getattr(result, "settings", {})),
        "diagnostics": _json_value(getattr(result, "diagnostics", {})),
        "stop_reason": str(getattr(result, "stop_reason", "converged")),
        "converged": bool(getattr(result, "converged", True)),
    }
    n_outer = getattr(result, "n_outer_iters", None)
    if n_outer is not None:
        record["n_outer_iters"] = int(n_outer)
    history = getattr(result, "history", None)
    if history is not None:
        record["history"] = _json_value(history)
    record["input_fingerprint"] = None if phases is None else input_fingerprint(phases)
    return record


def input_fingerprint(phases: pd.DataFrame) -> str:
    """SHA-256 of a phase table's canonical content.

    The digest covers the columns ``request_id, phase_type, t_start, t_end,
    prefill_tokens, decode_tokens`` (plus ``N_steps`` when present), so it
    ignores extra columns, row order and the index. Recipe: convert every
    value to a plain Python value (``phase_type`` stripped and lower-cased,
    times as ``float``, integral token and step counts as ``int``), sort the
    rows as tuples (by ``request_id``, ``phase_type``, ``t_start``, then the
    rest; ids of mixed types sort by type name and ``repr``), write one line
    per row of tab-separated ``repr`` values under a header line of column
    names, and hash the UTF-8 text.

    Args:
      phases: a phase table with the SPEC section 2 columns.

    Returns:
      64 hexadecimal characters.

    Raises:
      ValueError: a required column is missing.
    """
    cols = list(_FINGERPRINT_COLUMNS)
    missing = [c for c in cols if c not in phases.columns]
    if missing:
        raise ValueError(f"cannot fingerprint phases: missing column(s) {missing}")
    if "N_steps" in phases.columns:
        cols.append("N_steps")

    def count(v: Any) -> Any:
        v = _plain(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    columns = [
        [_plain(v) for v in phases["request_id"].tolist()],
        phases["phase_type"].astype(str).str.strip().str.lower().tolist(),
        [float(v) for v in phases["t_start"].tolist()],
        [float(v) for v in phases["t_end"].tolist()],
        *([count(v) for v in phases[c].tolist()] for c in cols[4:]),
    ]
    rows = list(zip(*columns, strict=True))
    try:
        rows.sort()
    except TypeError:  # ids of mixed, mutually unorderable types
        rows.sort(key=lambda r: (type(r[0]).__name__, repr(r[0]), *map(repr, r[1:])))
    lines = ["\t".join(cols)]
    lines.extend("\t".join(repr(v) for v in row) for row in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def write_json(
    result: Any, path: str | os.PathLike, *, phases: pd.DataFrame | None = None
) -> Path:
    """Write :func:`to_record` as indented JSON.

    Args:
      result: a fit result.
      path: output file.
      phases: optional phase table, recorded as ``input_fingerprint``.

    Returns:
      The path written.
    """
    record = to_record(result, phases=phases)
    path = Path(path)
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", "utf-8")
    return path


def write_yaml(
    result: Any, path: str | os.PathLike, *, phases: pd.DataFrame | None = None
) -> Path:
    """Write :func:`to_record` as YAML (needs PyYAML).

    Args:
      result: a fit result.
      path: output file.
      phases: optional phase table, recorded as ``input_fingerprint``.

    Returns:
      The path written.

    Raises:
      ImportError: PyYAML is not installed.
    """
    record = to_record(result, phases=phases)
    return _dump_yaml(record, Path(path), "write_yaml")


def to_blis(
    result: Any,
    *,
    model_id: str,
    gpu: str = "H100",
    tensor_parallelism: int = 1,
    vllm_version: str = "",
    alpha_coeffs: Sequence[float] = (0.0, 0.0, 0.0),
) -> dict[str, Any]:
    """One BLIS model entry with the fitted betas in microseconds.

    Args:
      result: a fit result with ``beta0`` (s/step), ``beta1`` (s/prefill
        token) and ``beta2`` (s/decode token).
      model_id: model name as BLIS knows it, e.g.
        ``"meta-llama/llama-3.1-8b-instruct"``.
      gpu: GPU name as BLIS knows it, e.g. ``"H100"``.
      tensor_parallelism: tensor-parallel degree (>= 1).
      vllm_version: the engine image or version the trace came from.
      alpha_coeffs: BLIS's three alpha (request-level overhead) coefficients
        in microseconds; jaxbeta does not estimate them, so they are passed
        through (default zeros).

    Returns:
      ``{"id", "GPU", "tensor_parallelism", "vllm_version", "alpha_coeffs",
      "beta_coeffs"}`` where ``beta_coeffs`` is ``[beta0 * 1e6, beta1 * 1e6,
      beta2 * 1e6]`` (microseconds per step / per prefill token / per decode
      token).

    Raises:
      ValueError: a beta or alpha is not finite, ``alpha_coeffs`` does not
        have three entries, ``model_id`` is empty or ``tensor_parallelism`` is
        not a positive integer.
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError("to_blis needs a non-empty model_id")
    if (
        isinstance(tensor_parallelism, bool)
        or not isinstance(tensor_parallelism, numbers.Integral)
        or tensor_parallelism < 1
    ):
        raise ValueError(
            f"tensor_parallelism must be a positive integer, got {tensor_parallelism!r}"
        )
    return {
        "id": model_id,
        "GPU": str(gpu),
        "tensor_parallelism": int(tensor_parallelism),
        "vllm_version": str(vllm_version),
        "alpha_coeffs": _alpha_list(alpha_coeffs),
        "beta_coeffs": _beta_microseconds(result),
    }


def write_blis(result: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a BLIS coefficients file (YAML; needs PyYAML).

    The file is a mapping ``{"models": [entry]}`` with the single
    :func:`to_blis` entry, the same shape as the ``models:`` list in BLIS's
    ``defaults.yaml``; merge the entry into that list (or point BLIS at the
    file where it accepts one) to use it.

    Args:
      result: a fit result.
      path: output file.
      **kwargs: passed to :func:`to_blis` (``model_id`` is required).

    Returns:
      The path written.

    Raises:
      ImportError: PyYAML is not installed.
    """
    entry = to_blis(result, **kwargs)
    return _dump_yaml({"models": [entry]}, Path(path), "write_blis")


def blis_cli_args(
    result: Any, *, alpha_coeffs: Sequence[float] = (0.0, 0.0, 0.0)
) -> str:
    """BLIS command-line flags that use the fitted betas.

    Args:
      result: a fit result (betas in seconds).
      alpha_coeffs: three alpha coefficients in microseconds (default zeros).

    Returns:
      ``"--latency-model blackbox --alpha-coeffs a,b,c --beta-coeffs x,y,z"``
      with the coefficients in microseconds, each written as the shortest
      decimal that round-trips (Python ``repr`` of the float).
    """
    alphas = ",".join(repr(v) for v in _alpha_list(alpha_coeffs))
    betas = ",".join(repr(v) for v in _beta_microseconds(result))
    return f"--latency-model blackbox --alpha-coeffs {alphas} --beta-coeffs {betas}"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _beta_microseconds(result: Any) -> list[float]:
    betas = [float(result.beta0), float(result.beta1), float(result.beta2)]
    if not all(math.isfinite(b) for b in betas):
        raise ValueError(f"cannot export non-finite betas {betas} (seconds)")
    return [b * _US_PER_S for b in betas]


def _alpha_list(alpha_coeffs: Sequence[float]) -> list[float]:
    try:
        alphas = [float(a) for a in alpha_coeffs]
    except (TypeError, ValueError):
        raise ValueError(
            f"alpha_coeffs must be three numbers, got {alpha_coeffs!r}"
        ) from None
    if len(alphas) != 3 or not all(math.isfinite(a) for a in alphas):
        raise ValueError(
            f"alpha_coeffs must be three finite numbers, got {alpha_coeffs!r}"
        )
    return alphas


def _dump_yaml(data: Any, path: Path, caller: str) -> Path:
    try:
        import yaml
    except ImportError as err:
        raise ImportError(
            f"{caller} needs PyYAML: pip install pyyaml (or use write_json)"
        ) from err
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    """NumPy scalars to the matching Python scalar; other values unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_value(value: Any) -> Any:
    """Convert to plain JSON types: dict, list, str, int, float, bool, None."""
    value = _plain(value)
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, pd.DataFrame):
        return [_json_value(row) for row in value.to_dict(orient="records")]
    if isinstance(value, pd.Series):
        return _json_value(value.to_dict())
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, set | frozenset):
        return [_json_value(v) for v in sorted(value, key=repr)]
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__array__"):  # NumPy and JAX arrays
        return _json_value(np.asarray(value).tolist())
    return str(value)
