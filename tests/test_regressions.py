"""Regression tests for problems found in review (each failed before its fix)."""

import numpy as np
import pandas as pd
import pytest

import jaxbeta
from jaxbeta import cli

TOY = pd.DataFrame(
    {
        "request_id": ["A", "A", "B", "B"],
        "phase_type": ["prefill", "decode", "prefill", "decode"],
        "t_start": [0.0, 2.0, 1.0, 3.0],
        "t_end": [2.0, 6.0, 3.0, 5.0],
        "prefill_tokens": [96, 0, 64, 0],
        "decode_tokens": [0, 4, 0, 2],
    }
)


def test_beta_informed_correction_is_zero_outside_every_prefill_window():
    # Prefills req4 [3, 4) and req1 [3.5, 3.501) (a short window with few
    # steps, so mu / W is large). Segments [4, 4.501) and [4.501, 5) lie in
    # no prefill window; SPEC section 8 puts no mass there. Rates: seed 0 of
    # tests/test_kernels.py's correction_setup (log-uniform 1e-2..1e2).
    import test_kernels as kernels

    table = pd.DataFrame(
        [
            ("req0", "prefill", 0.0, 0.5, 0, 0, 0.0),
            ("req1", "prefill", 3.5, 3.501, 0, 0, 2.0),
            ("req1", "decode", 3.501, 4.501, 0, 0, 0.0),
            ("req2", "decode", 0.0, 1.5, 0, 0, 0.0),
            ("req3", "prefill", 0.0, 1.0, 0, 0, 0.0),
            ("req3", "decode", 0.0, 2.0, 0, 0, 0.0),
            ("req4", "prefill", 3.0, 4.0, 0, 0, 2.0),
            ("req4", "decode", 4.0, 5.0, 0, 0, 0.0),
        ],
        columns=[*kernels.COLUMNS, "N_steps"],
    )
    case = kernels.TraceCase(table, 1.0, 0.0, 0.0)
    spec, prepared, spec_rate, outputs = kernels.correction_setup(case, 0)
    points, _, correction, _ = outputs
    length = np.diff(points)
    outside = (points[:-1] >= 4.0) & (length > 0)
    assert np.all(spec.beta_informed_correction(spec_rate)[-2:] == 0.0)
    mass = correction[outside] * length[outside]
    assert np.all(mass == 0.0), mass  # jaxbeta: [4.0e-14, 1.5e-12] tokens


def test_datetime_timestamp_columns_are_not_silently_rescaled():
    table = TOY.copy()
    for column in ("t_start", "t_end"):
        table[column] = pd.to_datetime(table[column], unit="s")
    # Either reject (not seconds) or convert to seconds; today the betas come
    # out ~1e6 times too large (beta0 = 1007132.67 instead of 1.0071).
    try:
        result = jaxbeta.estimate_betas_baseline(table, chunk_size=64)
    except ValueError:
        return
    expected = jaxbeta.estimate_betas_baseline(TOY, chunk_size=64)
    np.testing.assert_allclose(result.beta, expected.beta, rtol=1e-9)


def test_cli_missing_trace_file_exits_1_without_traceback(capsys, tmp_path):
    code = cli.main(["fit", str(tmp_path / "nowhere.csv"), "--chunk-size", "64"])
    assert code == 1  # today: FileNotFoundError propagates (traceback)
    assert "nowhere.csv" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs", [{"dtype": "banana"}, {"tol": None}, {"damping_eta": None}]
)
def test_bad_settings_raise_value_error(kwargs):
    estimator = (
        jaxbeta.estimate_betas_baseline
        if "dtype" in kwargs
        else jaxbeta.estimate_betas_iterative
    )
    with pytest.raises(ValueError):  # today: TypeError
        estimator(TOY, chunk_size=64, **kwargs)


def test_tol_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="tol"):  # today: "could not convert..."
        jaxbeta.estimate_betas_iterative(TOY, chunk_size=64, tol="small")
