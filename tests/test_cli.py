"""The command line on success: ``jaxbeta fit`` and ``examples/run.py``.

Failures (exit codes, messages without tracebacks) are tested in
test_validation.py; ``fit-many`` and ``simulate`` in test_batch.py and
test_simulate.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import jaxbeta
from jaxbeta import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = cli.sample_trace_path()
CHUNK = cli.SAMPLE_CHUNK_SIZE


def _run_example(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location(
        "example_run", REPO_ROOT / "examples" / "run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _fit_json(tmp_path, *flags: str) -> dict:
    out = tmp_path / "fit.json"
    argv = ["fit", SAMPLE, "--chunk-size", str(CHUNK), *flags, "--json", str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


def _betas(record: dict) -> np.ndarray:
    beta = record["beta"]
    return np.array([beta["beta0"], beta["beta1"], beta["beta2"]])


def test_example_fits_the_bundled_sample_with_no_arguments(capsys):
    assert _run_example([]) == 0
    out = capsys.readouterr().out
    expected = jaxbeta.estimate_betas_baseline(SAMPLE, chunk_size=CHUNK)
    assert "Estimated betas (baseline):" in out
    assert f"beta1 (sec/token): {expected.beta1:.6g}" in out


def test_example_iterative_prints_the_stop_and_the_history(capsys):
    assert _run_example(["--algo", "iterative"]) == 0
    out = capsys.readouterr().out
    expected = jaxbeta.estimate_betas_iterative(SAMPLE, chunk_size=CHUNK)
    assert f"outer iters: {expected.n_outer_iters}" in out
    assert f"stop reason: {expected.stop_reason}" in out
    last = expected.history["beta"][-1]
    assert f"iter {expected.n_outer_iters}: beta0={last[0]:.6g}" in out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--algo", "baseline"], lambda: jaxbeta.estimate_betas_baseline(
            SAMPLE, chunk_size=CHUNK
        )),
        # No loop flags: the reference's defaults (25 iterations, tol 1e-6).
        (["--algo", "iterative"], lambda: jaxbeta.estimate_betas_iterative(
            SAMPLE, chunk_size=CHUNK
        )),
        (["--algo", "iterative", "--max-outer-iters", "3"],
         lambda: jaxbeta.estimate_betas_iterative(
            SAMPLE, chunk_size=CHUNK, max_outer_iters=3
        )),
        # No loop flags: jaxbeta.fit's own defaults, not the reference's.
        (["--algo", "recommended"], lambda: jaxbeta.fit(SAMPLE, chunk_size=CHUNK)),
        (["--algo", "recommended", "--correction-mode", "beta_informed"],
         lambda: jaxbeta.fit(
            SAMPLE, chunk_size=CHUNK, prefill_correction_mode="beta_informed"
        )),
        (["--algo", "recommended", "--max-num-batched-tokens", str(2 * CHUNK)],
         lambda: jaxbeta.fit(
            SAMPLE, chunk_size=CHUNK, max_num_batched_tokens=2 * CHUNK
        )),
        (["--algo", "iterative", "--max-num-batched-tokens", str(2 * CHUNK)],
         lambda: jaxbeta.estimate_betas_iterative(
            SAMPLE, chunk_size=CHUNK, max_num_batched_tokens=2 * CHUNK
        )),
    ],
    ids=[
        "baseline",
        "iterative",
        "iterative-cap",
        "recommended",
        "recommended-mode",
        "recommended-budget",
        "iterative-budget",
    ],
)  # fmt: skip
def test_fit_command_runs_the_estimator_it_names(tmp_path, flags, expected):
    record = _fit_json(tmp_path, *flags)
    result = expected()
    assert record["algo"] == result.algo
    np.testing.assert_allclose(_betas(record), result.beta, rtol=1e-12, atol=0)
    if result.algo != "baseline":
        assert record["n_outer_iters"] == result.n_outer_iters
