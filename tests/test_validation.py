"""Host-side validation (SPEC section 2) and the CLI's handling of bad input.

Every rejection is a ``ValueError`` whose message names the problem and,
where rows are at fault, shows the offending rows or ids; each test checks
both. Inputs that only look odd (tokens on the other kind's row, upper-case
phase types, a CSV path instead of a DataFrame) must give the same fit as
the clean table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import jaxbeta
from jaxbeta import cli, estimate_betas_baseline, estimate_betas_iterative

CHUNK = 64


def clean_table() -> pd.DataFrame:
    """SPEC section 9's worked example with distinctive ids and row labels."""
    return pd.DataFrame(
        {
            "request_id": ["req-A", "req-A", "req-B", "req-B"],
            "phase_type": ["prefill", "decode", "prefill", "decode"],
            "t_start": [0.0, 2.0, 1.0, 3.0],
            "t_end": [2.0, 6.0, 3.0, 5.0],
            "prefill_tokens": [96, 0, 64, 0],
            "decode_tokens": [0, 4, 0, 2],
        },
        index=["row-a", "row-b", "row-c", "row-d"],
    )


def rejection(
    table: pd.DataFrame | None = None, *, match: str, estimator=None, **kwargs
) -> str:
    """The message of the ``ValueError`` that fitting ``table`` must raise.

    Args:
      table: the phase table (default: the clean one).
      match: regular expression naming the problem; must occur in the message.
      estimator: ``estimate_betas_baseline`` (default) or the iterative one.
      **kwargs: estimator keywords; ``chunk_size`` defaults to 64.

    Returns:
      The message, for checks that it shows the offending rows or values.
    """
    table = clean_table() if table is None else table
    estimator = estimator or estimate_betas_baseline
    kwargs.setdefault("chunk_size", CHUNK)
    with pytest.raises(ValueError, match=match) as info:
        estimator(table, **kwargs)
    return str(info.value)


def with_value(column: str, row: str, value) -> pd.DataFrame:
    """The clean table with ``value`` at (``row``, ``column``)."""
    table = clean_table()
    table[column] = table[column].astype(object)
    table.loc[row, column] = value
    return table


@pytest.fixture(scope="module")
def clean_beta() -> np.ndarray:
    return estimate_betas_baseline(clean_table(), chunk_size=CHUNK).beta


# --------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("chunk_size", [0, -64, 0.0, math.nan, math.inf])
@pytest.mark.parametrize(
    "estimator", [estimate_betas_baseline, estimate_betas_iterative]
)
def test_chunk_size_must_be_positive(chunk_size, estimator):
    message = rejection(
        chunk_size=chunk_size, estimator=estimator, match=r"`chunk_size` must be > 0"
    )
    assert repr(chunk_size) in message


@pytest.mark.parametrize("chunk_size", ["sixty-four", None, [64]])
def test_chunk_size_must_be_a_number(chunk_size):
    message = rejection(
        chunk_size=chunk_size, match=r"`chunk_size` must be a positive number"
    )
    assert repr(chunk_size) in message


@pytest.mark.parametrize("value", [-0.5, -1e-9, math.nan, "soon"])
def test_min_duration_must_be_a_number_at_least_zero(value):
    message = rejection(min_duration_sec=value, match=r"`min_duration_sec` must be")
    assert ">= 0" in message
    assert repr(value) in message


@pytest.mark.parametrize("mode", ["beta_informed", "middle", "END", ""])
def test_baseline_correction_mode_must_be_known(mode):
    message = rejection(correction_mode=mode, match=r"`correction_mode` must be one of")
    assert repr(mode) in message
    assert "'end'" in message  # lists the valid modes


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("prefill_correction_mode", "middle"),
        ("prefill_correction_mode", "BETA_INFORMED"),
        ("init_via_baseline_correction", "beta_informed"),
        ("init_via_baseline_correction", "middle"),
    ],
)
def test_iterative_correction_modes_must_be_known(keyword, value):
    message = rejection(
        estimator=estimate_betas_iterative,
        match=f"`{keyword}` must be one of",
        **{keyword: value},
    )
    assert repr(value) in message


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "25"])
def test_max_outer_iters_must_be_a_positive_integer(value):
    message = rejection(
        estimator=estimate_betas_iterative,
        max_outer_iters=value,
        match=r"`max_outer_iters` must be (a positive integer|> 0)",
    )
    assert repr(value) in message


@pytest.mark.parametrize("value", [0, 0.0, -1e-6, math.nan, math.inf])
def test_tol_must_be_positive(value):
    message = rejection(
        estimator=estimate_betas_iterative, tol=value, match=r"`tol` must be > 0"
    )
    assert repr(value) in message


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, 1.0000001, math.nan])
def test_damping_eta_must_be_in_zero_one(value):
    message = rejection(
        estimator=estimate_betas_iterative,
        damping_eta=value,
        match=r"`damping_eta` must be in \(0, 1\]",
    )
    assert repr(value) in message


def test_dtype_must_be_float64_or_float32():
    message = rejection(dtype="float16", match=r"`dtype` must be 'float64' or")
    assert "'float16'" in message


# --------------------------------------------------------------------------
# Table shape


@pytest.mark.parametrize(
    "column",
    ["request_id", "phase_type", "t_start", "t_end", "prefill_tokens", "decode_tokens"],
)
def test_missing_column_is_named(column):
    message = rejection(
        clean_table().drop(columns=column), match=r"missing required column"
    )
    assert repr(column) in message.split(";")[0]


def test_renamed_columns_work_through_the_col_keywords(clean_beta):
    names = {
        "request_id": "rid",
        "phase_type": "kind",
        "t_start": "begin",
        "t_end": "finish",
        "prefill_tokens": "prompt",
        "decode_tokens": "generated",
    }
    table = clean_table().rename(columns=names)
    table["steps"] = [2, 4, 1, 2]
    keywords = {f"{canonical}_col": name for canonical, name in names.items()}
    result = estimate_betas_baseline(
        table, chunk_size=CHUNK, n_steps_col="steps", **keywords
    )
    np.testing.assert_array_equal(result.beta, clean_beta)
    # Without the keywords the default names are missing, and named.
    message = rejection(table, match=r"missing required column\(s\) \['request_id'")
    assert "'rid'" in message  # and shows the columns the table has


def test_empty_table_is_rejected():
    rejection(clean_table().iloc[0:0], match=r"the phase table is empty")


@pytest.mark.parametrize(
    "phases", [[("req-A", "prefill", 0.0, 1.0, 5, 0)], 42, {"t_start": [0.0]}]
)
def test_phases_must_be_a_table_or_a_path(phases):
    message = rejection(phases, match=r"`phases` must be a pandas DataFrame or a path")
    assert type(phases).__name__ in message


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.csv"
    message = rejection(str(path), match=r"trace file not found")
    assert "nowhere.csv" in message


# --------------------------------------------------------------------------
# Row values


def test_non_positive_duration_shows_the_rows():
    table = clean_table()
    table.loc["row-b", "t_end"] = 2.0  # t_end == t_start
    table.loc["row-c", "t_end"] = 0.5  # t_end < t_start
    message = rejection(table, match=r"non-positive duration \(t_end <= t_start\)")
    assert "2 row(s)" in message
    assert "row-b" in message and "row-c" in message
    assert "req-A" in message and "req-B" in message
    assert "row-a" not in message  # only the offending rows


def test_bad_phase_types_are_listed():
    table = clean_table()
    table.loc["row-b", "phase_type"] = "decoding"
    table.loc["row-d", "phase_type"] = "prefil"
    message = rejection(table, match=r"must be 'prefill' or 'decode' \(any case\)")
    assert "'decoding'" in message and "'prefil'" in message
    assert "row-b" in message and "row-d" in message


def test_missing_phase_type_is_a_bad_value():
    message = rejection(
        with_value("phase_type", "row-c", None), match=r"'prefill' or 'decode'"
    )
    assert "None" in message and "row-c" in message


@pytest.mark.parametrize("column", ["t_start", "t_end"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_timestamps_show_the_rows(column, value):
    message = rejection(
        with_value(column, "row-c", value), match=f"column {column!r} must be finite"
    )
    assert "req-B" in message and "row-c" in message


@pytest.mark.parametrize(
    ("column", "row"),
    [
        ("t_start", "row-a"),
        ("t_end", "row-d"),
        ("prefill_tokens", "row-c"),
        ("decode_tokens", "row-b"),
    ],
)
def test_non_numeric_values_show_the_rows(column, row):
    message = rejection(
        with_value(column, row, "soon-ish"),
        match=f"column {column!r} has non-numeric values",
    )
    assert "soon-ish" in message and row in message


def test_boolean_columns_are_not_numbers():
    table = clean_table()
    table["decode_tokens"] = [False, True, False, True]
    rejection(table, match=r"column 'decode_tokens' must be numeric, not boolean")


def test_a_boolean_among_numbers_shows_the_row():
    message = rejection(
        with_value("prefill_tokens", "row-c", True),
        match=r"column 'prefill_tokens' has non-numeric values in 1 row",
    )
    assert "row-c" in message


@pytest.mark.parametrize(
    ("column", "row"), [("prefill_tokens", "row-c"), ("decode_tokens", "row-d")]
)
def test_negative_token_counts_show_the_rows(column, row):
    message = rejection(
        with_value(column, row, -7), match=f"column {column!r} has negative token"
    )
    assert "-7" in message and row in message


@pytest.mark.parametrize(
    ("column", "row"), [("prefill_tokens", "row-a"), ("decode_tokens", "row-b")]
)
def test_fractional_token_counts_show_the_rows(column, row):
    message = rejection(
        with_value(column, row, 95.5), match=f"column {column!r} has fractional token"
    )
    assert "95.5" in message and row in message


@pytest.mark.parametrize(
    ("column", "row"), [("prefill_tokens", "row-a"), ("decode_tokens", "row-d")]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, None])
def test_missing_token_count_on_its_own_row_shows_the_row(column, row, value):
    message = rejection(
        with_value(column, row, value),
        match=f"column {column!r} must be a finite count",
    )
    assert row in message


@pytest.mark.parametrize("value", [None, math.nan])
def test_missing_request_id_shows_the_row(value):
    message = rejection(
        with_value("request_id", "row-c", value), match=r"'request_id' is missing"
    )
    assert "row-c" in message and "prefill" in message


def test_duplicate_prefill_rows_list_the_ids():
    table = pd.concat(
        [clean_table(), clean_table().loc[["row-a", "row-c"]].set_axis(["x", "y"])]
    )
    message = rejection(table, match=r"more than one prefill row for 2 request id")
    assert "'req-A'" in message and "'req-B'" in message


# --------------------------------------------------------------------------
# N_steps


def with_steps(last) -> pd.DataFrame:
    """The clean table with an ``N_steps`` column; ``last`` on row-d."""
    table = clean_table()
    table["N_steps"] = pd.Series([2, 4, 1, last], index=table.index, dtype=object)
    return table


@pytest.mark.parametrize("value", [-1, -2.0])
def test_negative_step_counts_show_the_rows(value):
    message = rejection(
        with_steps(value), match=r"negative step counts in column 'N_steps'"
    )
    assert "row-d" in message and str(value) in message


@pytest.mark.parametrize("value", [2.5, 2.00001])
def test_fractional_step_counts_show_the_rows(value):
    message = rejection(with_steps(value), match=r"must be integers \(within 1e-6\)")
    assert "row-d" in message and str(value) in message


@pytest.mark.parametrize("value", [math.nan, math.inf, None])
def test_non_finite_step_counts_show_the_rows(value):
    message = rejection(with_steps(value), match=r"non-finite step counts")
    assert "row-d" in message and "req-B" in message


def test_step_counts_within_1e6_of_an_integer_are_that_integer(clean_beta):
    nearly = estimate_betas_baseline(with_steps(2 + 4e-7), chunk_size=CHUNK)
    exact = estimate_betas_baseline(with_steps(2), chunk_size=CHUNK)
    np.testing.assert_array_equal(nearly.beta, exact.beta)
    # The derived counts of the clean table are the same numbers.
    np.testing.assert_array_equal(exact.beta, clean_beta)


def test_non_finite_derived_steps_are_rejected():
    # C = 1e-310 is positive, but P / C overflows: N_i is infinite.
    message = rejection(chunk_size=1e-310, match=r"non-finite N_i")
    assert "row-a" in message


def test_iterative_rejects_a_non_finite_initialisation():
    # Step counts near the float64 range overflow the initialising baseline's
    # exposures: the reference's baseline raises there, and the iterative
    # estimator raises too instead of returning NaN betas.
    table = clean_table()
    table["N_steps"] = 1e308
    baseline = rejection(table, match=r"non-finite A_pf_i")
    iterative = rejection(
        table,
        match=r"baseline initialisation .*non-finite A_pf_i",
        estimator=estimate_betas_iterative,
    )
    assert "row-a" in baseline and "row-a" in iterative


# --------------------------------------------------------------------------
# Accepted inputs


@pytest.mark.parametrize(
    ("column", "row", "value"),
    [
        ("decode_tokens", "row-a", math.nan),
        ("decode_tokens", "row-c", "n/a"),
        ("decode_tokens", "row-c", -3.5),
        ("prefill_tokens", "row-b", math.nan),
        ("prefill_tokens", "row-d", "unknown"),
    ],
)
def test_token_counts_on_the_other_row_are_ignored(column, row, value, clean_beta):
    result = estimate_betas_baseline(with_value(column, row, value), chunk_size=CHUNK)
    np.testing.assert_array_equal(result.beta, clean_beta)


def test_phase_type_case_is_ignored(clean_beta):
    table = clean_table()
    table["phase_type"] = ["PREFILL", "Decode", "Prefill", "DECODE"]
    result = estimate_betas_baseline(table, chunk_size=CHUNK)
    np.testing.assert_array_equal(result.beta, clean_beta)


def test_csv_path_works_like_a_dataframe(tmp_path, clean_beta):
    path = tmp_path / "trace.csv"
    clean_table().to_csv(path, index=False)
    from_frame = estimate_betas_baseline(clean_table(), chunk_size=CHUNK)
    for phases in (str(path), path):
        from_path = estimate_betas_baseline(phases, chunk_size=CHUNK)
        np.testing.assert_array_equal(from_path.beta, clean_beta)
        assert from_path.diagnostics["r2"] == from_frame.diagnostics["r2"]
        np.testing.assert_array_equal(
            from_path.features.to_numpy(), from_frame.features.to_numpy()
        )


def test_row_validation_reports_csv_rows_too(tmp_path):
    path = tmp_path / "bad.csv"
    table = clean_table()
    table.loc["row-d", "t_end"] = 3.0
    table.to_csv(path, index=False)
    message = rejection(str(path), match=r"non-positive duration")
    assert "req-B" in message


# --------------------------------------------------------------------------
# Command line


@pytest.fixture
def trace_csv(tmp_path) -> str:
    path = tmp_path / "trace.csv"
    clean_table().to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("chunk_size", ["0", "-64"])
def test_cli_reports_a_bad_chunk_size_without_traceback(trace_csv, capsys, chunk_size):
    assert cli.main(["fit", trace_csv, "--chunk-size", chunk_size]) == 1
    captured = capsys.readouterr()
    assert "chunk_size" in captured.err and "> 0" in captured.err
    assert captured.err.startswith("jaxbeta: error:")
    assert "Traceback" not in captured.err + captured.out


def test_cli_reports_bad_rows_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    table = clean_table()
    table.loc["row-b", "t_start"] = 6.0
    table.to_csv(path, index=False)
    assert cli.main(["fit", str(path), "--chunk-size", "64"]) == 1
    captured = capsys.readouterr()
    assert "non-positive duration" in captured.err and "req-A" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_cli_reports_bad_loop_settings_without_traceback(trace_csv, capsys):
    argv = ["fit", trace_csv, "--chunk-size", "64", "--algo", "iterative"]
    assert cli.main([*argv, "--damping-eta", "1.5"]) == 1
    assert "damping_eta" in capsys.readouterr().err
    # The baseline has no token budget: say so, do not drop it.
    baseline = ["fit", trace_csv, "--chunk-size", "64", "--algo", "baseline"]
    assert cli.main([*baseline, "--max-num-batched-tokens", "128"]) == 1
    assert "not of the baseline" in capsys.readouterr().err
    recommended = ["fit", trace_csv, "--chunk-size", "64", "--algo", "recommended"]
    assert cli.main([*recommended, "--max-num-batched-tokens", "0"]) == 1
    assert "max_num_batched_tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["fit"],
        ["fit", "{trace}"],  # --chunk-size is required
        ["fit", "{trace}", "--chunk-size", "sixty-four"],
        ["fit", "{trace}", "--chunk-size", "64", "--algo", "magic"],
    ],
    ids=["no-command", "no-path", "no-chunk-size", "chunk-size-text", "bad-algo"],
)
def test_cli_usage_errors_exit_2(arguments, trace_csv, capsys):
    argv = [argument.format(trace=trace_csv) for argument in arguments]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "usage:" in captured.err and "Traceback" not in captured.err


def test_prepare_trace_rejects_a_padding_smaller_than_the_trace():
    with pytest.raises(ValueError, match=r"`n_pad` \(3\) is smaller than the trace"):
        jaxbeta.prepare_trace(clean_table(), n_pad=3)
