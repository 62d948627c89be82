"""Floating-point precision policy.

jaxbeta computes in float64 by default: the parity set needs it (a float32
fit moves betas by about 1e-7, far outside the 1e-9 tolerance). JAX keeps
64-bit types off unless ``jax_enable_x64`` is set, and flipping that global
switch on import would change the dtypes of every other JAX program in the
user's process. So jaxbeta never touches the global flag: each public entry
point runs its computation inside the thread-local ``jax.enable_x64(True)``
context and returns host values (Python floats, NumPy arrays). Outside those
calls the user's JAX configuration is exactly what it was.

Array-level functions (``fit_baseline_arrays``, ``fit_iterative_arrays``) are
pure JAX and use whatever precision is in force where they are traced: call
them under ``jaxbeta.float64()`` (an alias of ``jax.enable_x64(True)``) or with
``jax_enable_x64`` set to get float64; without it they run in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

__all__ = ["float64", "precision_context", "resolve_dtype"]

_DTYPES = {"float64": np.float64, "float32": np.float32}


def resolve_dtype(dtype) -> np.dtype:
    """Returns the NumPy dtype named by ``dtype`` ("float64" or "float32").

    Raises:
      ValueError: for any other dtype.
    """
    try:
        name = np.dtype(dtype).name if dtype is not None else "float64"
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"`dtype` must be 'float64' or 'float32', got {dtype!r}")
    return np.dtype(_DTYPES[name])


@contextlib.contextmanager
def precision_context(dtype) -> Iterator[None]:
    """Runs the enclosed JAX work with 64-bit types on iff ``dtype`` is float64.

    The switch is JAX's thread-local ``enable_x64`` context, restored on exit.
    """
    with jax.enable_x64(resolve_dtype(dtype) == np.float64):
        yield


def float64() -> contextlib.AbstractContextManager:
    """Context manager enabling float64 for jaxbeta's array-level functions.

    Example:
      >>> with jaxbeta.float64():
      ...     fit = jaxbeta.fit_baseline_arrays(arrays, chunk_size=64.0)
    """
    return jax.enable_x64(True)
