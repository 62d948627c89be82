"""The JAX contract of the array-level fits (SPEC section 10).

Both fits must give the same answer jitted and eagerly, for any padding,
alone and inside ``jax.vmap``; they compile once per padded shape; float32
works; the user's JAX configuration is never changed; Unix-epoch timestamps
lose nothing.

Compiling dominates the cost, so the tests share padded sizes: ``SMALL_PAD``
for the hand-written traces and ``API_PAD``, the bucket that the public entry
points pick for traces of 33-64 rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxbeta
from jaxbeta import fit_baseline_arrays, fit_iterative_arrays, prepare_trace

SMALL_PAD = 16
API_PAD = 64
CHUNK = np.float64(64.0)
COLUMNS = [
    "request_id",
    "phase_type",
    "t_start",
    "t_end",
    "prefill_tokens",
    "decode_tokens",
]

# SPEC section 9's worked example; the MM fit converges after 7 iterations.
TOY = pd.DataFrame(
    [
        ("A", "prefill", 0.0, 2.0, 96, 0),
        ("A", "decode", 2.0, 6.0, 0, 4),
        ("B", "prefill", 1.0, 3.0, 64, 0),
        ("B", "decode", 3.0, 5.0, 0, 2),
    ],
    columns=COLUMNS,
)

# Six rows, overlapping and tied phases; the MM fit converges after 8.
SECOND = pd.DataFrame(
    [
        ("r0", "prefill", 0.0, 3.0, 185, 0),
        ("r0", "decode", 3.0, 4.0, 0, 4),
        ("r1", "prefill", 0.0, 2.0, 163, 0),
        ("r1", "decode", 2.0, 5.0, 0, 1),
        ("r2", "prefill", 3.0, 4.0, 131, 0),
        ("r2", "decode", 4.0, 6.0, 0, 3),
    ],
    columns=COLUMNS,
)

# Cheap to run op by op: without jit every projected-gradient iteration is
# dispatched primitive by primitive, and this trace's NNLS solves take 150,
# 120 and 85 iterations (the worked example's baseline takes 400). Its fits
# have beta0 exactly 0 at the bound, and the MM steps move beta by 0.027 and
# 3.4e-4.
EAGER = pd.DataFrame(
    [
        ("r0", "prefill", 3.0, 4.0, 54, 0),
        ("r0", "decode", 4.0, 6.0, 0, 4),
        ("r1", "prefill", 1.0, 4.0, 43, 0),
        ("r1", "decode", 4.0, 7.0, 0, 4),
        ("r2", "prefill", 0.0, 1.0, 187, 0),
        ("r2", "decode", 1.0, 3.0, 0, 2),
    ],
    columns=COLUMNS,
)


def padded(table: pd.DataFrame, n_pad: int) -> jaxbeta.PhaseArrays:
    """The table's padded arrays (float64 times)."""
    return prepare_trace(table, n_pad=n_pad).arrays


def baseline(arrays, chunk=CHUNK):
    """``fit_baseline_arrays`` called as ``estimate_betas_baseline`` calls it,
    so that both share one compiled program per padded size."""
    return fit_baseline_arrays(arrays, chunk, np.float64(0.0), correction_mode="end")


def iterative(arrays, chunk=CHUNK, tol=1e-6):
    """``fit_iterative_arrays`` with the defaults of the public entry point,
    in the same call form (one compiled program per padded size)."""
    return fit_iterative_arrays(
        arrays,
        chunk,
        np.float64(0.0),
        prefill_correction_mode="beta_informed",
        max_outer_iters=25,
        tol=np.float64(tol),
        damping_eta=np.float64(1.0),
        init_via_baseline_correction="end",
    )


def assert_trees_close(actual, expected, rtol: float) -> None:
    """Leaf by leaf: floats within ``rtol`` (plus ``rtol`` times the leaf's
    largest value, for entries that should be 0), NaN where NaN, integers and
    booleans equal."""
    actual_leaves, actual_tree = jax.tree.flatten(jax.device_get(actual))
    expected_leaves, expected_tree = jax.tree.flatten(jax.device_get(expected))
    assert actual_tree == expected_tree
    for index, (got, want) in enumerate(
        zip(actual_leaves, expected_leaves, strict=True)
    ):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape and got.dtype == want.dtype, index
        if np.issubdtype(want.dtype, np.floating):
            scale = np.max(np.abs(want[np.isfinite(want)]), initial=0.0)
            np.testing.assert_allclose(
                got, want, rtol=rtol, atol=rtol * scale, equal_nan=True,
                err_msg=f"leaf {index}",
            )  # fmt: skip
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"leaf {index}")


def rows_of(fit, n: int) -> np.ndarray:
    """Per-row features [N_i, T_i, exposure_prefill, exposure_decode] of the
    first ``n`` (real) rows."""
    fit = jax.device_get(fit)
    columns = [fit.steps, fit.duration, fit.exposure_prefill, fit.exposure_decode]
    return np.stack([np.asarray(column)[:n] for column in columns], axis=1)


# --------------------------------------------------------------------------
# jit and eager agree


def test_baseline_fit_without_jit_equals_the_jitted_fit():
    arrays = padded(EAGER, SMALL_PAD)
    with jax.enable_x64(True):
        jitted = baseline(arrays)
        with jax.disable_jit():
            eager = baseline(arrays)
    assert np.asarray(jitted.beta)[0] == 0.0
    assert_trees_close(eager, jitted, rtol=1e-12)


def test_iterative_fit_without_jit_equals_the_jitted_fit():
    arrays = padded(EAGER, SMALL_PAD)
    # tol = 1e-3 stops the loop after two outer iterations: the loop body
    # runs twice, and op by op that is all the time a test can afford.
    with jax.enable_x64(True):
        jitted = iterative(arrays, tol=1e-3)
        with jax.disable_jit():
            eager = iterative(arrays, tol=1e-3)
    assert int(jitted.n_outer_iters) == 2 and bool(jitted.converged)
    assert_trees_close(eager, jitted, rtol=1e-12)


# --------------------------------------------------------------------------
# Padding, retracing, vmap


def test_padding_does_not_change_the_fits():
    n = len(TOY)
    small, large = padded(TOY, SMALL_PAD), padded(TOY, API_PAD)
    with jax.enable_x64(True):
        for fit in (baseline, iterative):
            result_small, result_large = fit(small), fit(large)
            np.testing.assert_allclose(
                result_large.beta, result_small.beta, rtol=1e-12, atol=0
            )
            np.testing.assert_allclose(
                rows_of(result_large, n), rows_of(result_small, n), rtol=1e-12
            )
    assert int(result_small.n_outer_iters) == int(result_large.n_outer_iters) == 7
    np.testing.assert_allclose(
        result_large.history_beta, result_small.history_beta, rtol=1e-12
    )


@pytest.mark.parametrize("fit", [baseline, iterative], ids=["baseline", "iterative"])
def test_new_data_of_the_same_shape_does_not_retrace(fit):
    jitted = fit_baseline_arrays if fit is baseline else fit_iterative_arrays
    with jax.enable_x64(True):
        fit(padded(TOY, SMALL_PAD))
        compiled = jitted._cache_size()
        fit(padded(SECOND, SMALL_PAD))
        fit(padded(SECOND, SMALL_PAD), chunk=np.float64(16.0))
        assert jitted._cache_size() == compiled


def test_vmap_gives_each_trace_its_own_answer():
    traces = [padded(TOY, SMALL_PAD), padded(SECOND, SMALL_PAD)]
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *traces)
    with jax.enable_x64(True):
        for fit in (baseline, iterative):
            batched = jax.device_get(jax.vmap(fit)(stacked))
            for index, arrays in enumerate(traces):
                alone = jax.device_get(fit(arrays))
                np.testing.assert_allclose(
                    batched.beta[index], alone.beta, rtol=1e-9, atol=1e-15
                )
                if fit is iterative:
                    assert batched.n_outer_iters[index] == alone.n_outer_iters
                    assert batched.converged[index] == alone.converged
    # The two traces stop at different iterations, so the batched loop must
    # freeze the first one while the second keeps going.
    assert list(batched.n_outer_iters) == [7, 8]


# --------------------------------------------------------------------------
# Precision policy


@pytest.fixture(scope="module")
def simulated() -> jaxbeta.SimulationResult:
    """A 60-row simulated trace (one API_PAD bucket), C = 64."""
    result = jaxbeta.simulate(
        30,
        beta=(0.006, 3e-5, 1.5e-4),
        chunk_size=64,
        arrival_rate=40.0,
        prompt_dist=("uniform", 20, 400),
        output_dist=("uniform", 1, 40),
        seed=3,
    )
    assert len(result.phases) <= API_PAD
    return result


def test_float32_agrees_with_float64_and_x64_stays_off(simulated):
    assert not jax.config.jax_enable_x64
    exact = jaxbeta.estimate_betas_baseline(simulated.phases, chunk_size=64)
    assert not jax.config.jax_enable_x64
    assert jnp.ones(3).dtype == jnp.float32
    single = jaxbeta.estimate_betas_baseline(
        simulated.phases, chunk_size=64, dtype="float32"
    )
    assert not jax.config.jax_enable_x64
    assert jnp.ones(3).dtype == jnp.float32
    assert min(exact.beta) > 0
    np.testing.assert_allclose(single.beta, exact.beta, rtol=1e-3)
    assert single.settings["dtype"] == "float32"


def test_unix_epoch_timestamps_give_the_same_betas(simulated):
    # Times on a 2**-12 s grid: adding 1.7e9 s is exact in float64, so both
    # tables hold the same trace.
    at_zero = simulated.phases.copy()
    for column in ("t_start", "t_end"):
        at_zero[column] = np.round(at_zero[column] * 4096.0) / 4096.0
    at_epoch = at_zero.copy()
    at_epoch[["t_start", "t_end"]] += 1.7e9
    assert ((at_epoch["t_end"] - at_epoch["t_start"]) > 0).all()
    np.testing.assert_array_equal(at_epoch["t_start"] - 1.7e9, at_zero["t_start"])
    for estimate in (jaxbeta.estimate_betas_baseline, jaxbeta.estimate_betas_iterative):
        zero = estimate(at_zero, chunk_size=64)
        epoch = estimate(at_epoch, chunk_size=64)
        np.testing.assert_allclose(epoch.beta, zero.beta, rtol=1e-9, atol=0)
