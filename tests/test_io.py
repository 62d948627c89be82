"""Tests for the trace readers and the OTLP writer (jaxbeta._io)."""

from __future__ import annotations

import json
import warnings
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaxbeta._io import PHASE_COLUMNS, _ns_to_seconds, read_trace, write_otlp_spans

FIXTURES = Path(__file__).parent / "fixtures" / "io"
EPOCH_ULP = float(np.spacing(1.7e9))  # float64 resolution of Unix seconds


def _quiet_read(path, **kw) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return read_trace(path, **kw)


def _worked_example(ids=("A", "A", "B", "B")) -> pd.DataFrame:
    """SPEC section 9's four phases, in seconds."""
    return pd.DataFrame(
        {
            "request_id": list(ids),
            "phase_type": ["prefill", "decode", "prefill", "decode"],
            "t_start": [0.0, 2.0, 1.0, 3.0],
            "t_end": [2.0, 6.0, 3.0, 5.0],
            "prefill_tokens": np.array([96, 0, 64, 0], dtype=np.int64),
            "decode_tokens": np.array([0, 4, 0, 2], dtype=np.int64),
        }
    )


def _exact_seconds(start_ns: int, *offsets: float) -> Decimal:
    """Span start plus latency attributes, in exact decimal arithmetic."""
    return Decimal(start_ns) / Decimal(10**9) + sum(
        (Decimal(repr(o)) for o in offsets), Decimal(0)
    )


def _assert_seconds(actual: np.ndarray, exact: list[Decimal], tol: float) -> None:
    errors = [abs(Decimal(float(a)) - e) for a, e in zip(actual, exact, strict=True)]
    assert max(errors) <= Decimal(tol), errors


# --------------------------------------------------------------------------
# OTLP spans
# --------------------------------------------------------------------------


def test_otlp_json_gives_prefill_and_decode_rows():
    with pytest.warns(UserWarning, match=r"skipped 1 span.*POST /v1/completions"):
        table = read_trace(FIXTURES / "otlp_spans.json")

    assert list(table.columns) == list(PHASE_COLUMNS)
    assert table["request_id"].tolist() == [
        "cmpl-a",
        "cmpl-a",
        "cmpl-b",
        "cmpl-b",
        "9f8e7d6c5b4a3921",  # no gen_ai.request.id: the span id
        "cmpl-d",
        "cmpl-d",
    ]
    assert table["phase_type"].tolist() == [
        "prefill",
        "decode",
        "prefill",
        "decode",
        "prefill",  # one-token request: no decode row
        "prefill",
        "decode",
    ]
    # 200 prompt tokens of which 128 cached -> 72; completion - 1 decode tokens.
    assert table["prefill_tokens"].tolist() == [96, 0, 72, 0, 10, 512, 0]
    assert table["decode_tokens"].tolist() == [0, 4, 0, 2, 0, 0, 8]
    assert table["t_start"].dtype == np.float64
    assert table["prefill_tokens"].dtype == np.int64

    a, b, c, d = (
        1700000000123456789,
        1700000000500000000,
        1700000001000000001,
        1700000001200000000,
    )
    # prefill = [start + ttft - prefill, start + ttft]; decode = [.., + decode]
    exact_start = [
        _exact_seconds(a, 0.25) - Decimal("0.2"),
        _exact_seconds(a, 0.25),
        _exact_seconds(b, 0.4) - Decimal("0.3"),
        _exact_seconds(b, 0.4),
        _exact_seconds(c, 0.05) - Decimal("0.04"),
        _exact_seconds(d, 0.125) - Decimal("0.125"),
        _exact_seconds(d, 0.125),
    ]
    exact_end = [
        _exact_seconds(a, 0.25),
        _exact_seconds(a, 0.25, 0.5),
        _exact_seconds(b, 0.4),
        _exact_seconds(b, 0.4, 0.2),
        _exact_seconds(c, 0.05),
        _exact_seconds(d, 0.125),
        _exact_seconds(d, 0.125, 0.675),
    ]
    _assert_seconds(table["t_start"].to_numpy(), exact_start, EPOCH_ULP)
    _assert_seconds(table["t_end"].to_numpy(), exact_end, EPOCH_ULP)


def test_otlp_jsonl_twin_reads_the_same():
    whole = _quiet_read(FIXTURES / "otlp_spans.json")
    lines = _quiet_read(FIXTURES / "otlp_spans.jsonl")
    explicit = _quiet_read(FIXTURES / "otlp_spans.jsonl", format="otlp")
    pd.testing.assert_frame_equal(whole, lines)
    pd.testing.assert_frame_equal(whole, explicit)


def test_otlp_warns_once_for_all_skipped_spans():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_trace(FIXTURES / "otlp_spans.jsonl")
    assert len(caught) == 1
    assert "skipped 1 span" in str(caught[0].message)


def test_ns_to_seconds_rounds_once():
    ns = 1700000000123456789
    got = float(_ns_to_seconds([ns])[0])
    exact = Decimal(ns) / Decimal(10**9)
    assert abs(Decimal(got) - exact) <= Decimal(EPOCH_ULP) / 2
    # Small values keep nanosecond precision.
    assert _ns_to_seconds([1_000_000_001])[0] == 1.000000001


def test_otlp_missing_attribute_names_span_and_key():
    with pytest.raises(
        ValueError,
        match=r"otlp_missing_attribute\.json, span 'eee19b7ec3c1b174'.*"
        r"gen_ai\.latency\.time_in_model_prefill",
    ):
        read_trace(FIXTURES / "otlp_missing_attribute.json")


def test_otlp_bad_time_string_names_span_and_field():
    with pytest.raises(
        ValueError,
        match=r"otlp_bad_time\.json, span 'c0ffee0000000001'.*startTimeUnixNano.*"
        r"1\.7000000001e18",
    ):
        read_trace(FIXTURES / "otlp_bad_time.json")


def _edit_first_span(tmp_path: Path, edit) -> Path:
    doc = json.loads((FIXTURES / "otlp_spans.json").read_text())
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    edit(span)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(doc))
    return out


def _set_attr(span: dict, key: str, value: dict) -> None:
    for item in span["attributes"]:
        if item["key"] == key:
            item["value"] = value
            return
    span["attributes"].append({"key": key, "value": value})


def _drop_attr(span: dict, key: str) -> None:
    span["attributes"] = [a for a in span["attributes"] if a["key"] != key]


def test_otlp_decode_time_needed_only_with_decode_tokens(tmp_path):
    path = _edit_first_span(
        tmp_path, lambda s: _drop_attr(s, "gen_ai.latency.time_in_model_decode")
    )
    with pytest.raises(ValueError, match=r"span 'eee19b7ec3c1b174'.*time_in_model"):
        _quiet_read(path)

    def one_token(span):
        _drop_attr(span, "gen_ai.latency.time_in_model_decode")
        _set_attr(span, "gen_ai.usage.completion_tokens", {"intValue": "1"})

    table = _quiet_read(_edit_first_span(tmp_path, one_token))
    assert table["phase_type"].tolist()[:2] == ["prefill", "prefill"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("gen_ai.usage.prompt_tokens", {"intValue": "ninety"}, "must be an integer"),
        ("gen_ai.usage.cached_tokens", {"intValue": "500"}, "outside"),
        ("gen_ai.usage.completion_tokens", {"intValue": "0"}, "no token"),
        ("gen_ai.latency.time_to_first_token", {"stringValue": "fast"}, "seconds"),
        ("gen_ai.latency.time_in_model_prefill", {"doubleValue": -1.0}, "negative"),
    ],
)
def test_otlp_bad_attribute_values(tmp_path, key, value, message):
    path = _edit_first_span(tmp_path, lambda s: _set_attr(s, key, value))
    with pytest.raises(ValueError, match=rf"span 'eee19b7ec3c1b174'.*{message}"):
        _quiet_read(path)


# --------------------------------------------------------------------------
# vllm bench serve results
# --------------------------------------------------------------------------


def test_vllm_bench_serve_results():
    with pytest.warns(UserWarning) as record:
        table = read_trace(FIXTURES / "bench_serve.json")
    messages = [str(w.message) for w in record]
    assert any("client-side" in m and "queueing" in m for m in messages)
    assert any("dropped 1 failed request" in m for m in messages)

    assert table["request_id"].tolist() == [0, 0, 1, 3, 3]
    assert table["phase_type"].tolist() == [
        "prefill",
        "decode",
        "prefill",  # output_len 1: no decode row
        "prefill",
        "decode",
    ]
    assert table["prefill_tokens"].tolist() == [128, 0, 256, 32, 0]
    assert table["decode_tokens"].tolist() == [0, 3, 0, 0, 2]
    # latency = ttft + sum(itls) when e2els is absent
    np.testing.assert_allclose(
        table["t_start"], [0.0, 0.1, 0.05, 0.12, 0.27], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        table["t_end"], [0.1, 0.175, 0.25, 0.27, 0.36], rtol=0, atol=1e-12
    )


def test_vllm_bench_prefers_e2els(tmp_path):
    doc = json.loads((FIXTURES / "bench_serve.json").read_text())
    doc["e2els"] = [0.5, 0.2, 0.0, 0.3]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    table = _quiet_read(path, format="vllm-bench")
    decode = table[table["phase_type"] == "decode"]
    np.testing.assert_allclose(decode["t_end"], [0.5, 0.42], rtol=0, atol=1e-12)


def test_vllm_bench_mismatched_lengths_names_the_list():
    with pytest.raises(
        ValueError, match=r"bench_mismatched_lengths\.json.*\['ttfts'\].*ttfts=2"
    ):
        _quiet_read(FIXTURES / "bench_mismatched_lengths.json")


@pytest.mark.parametrize("key", ["start_times", "output_lens", "ttfts"])
@pytest.mark.parametrize("fmt", ["vllm-bench", "auto"])
def test_vllm_bench_missing_key(tmp_path, key, fmt):
    doc = json.loads((FIXTURES / "bench_serve.json").read_text())
    del doc[key]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"bench\.json.*lack key\(s\) '{key}'"):
        read_trace(path, format=fmt)


def test_vllm_bench_without_any_latency_source(tmp_path):
    doc = json.loads((FIXTURES / "bench_serve.json").read_text())
    del doc["itls"]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"e2els \(or latencies, or itls\)"):
        read_trace(path)


def test_vllm_bench_non_numeric_entry(tmp_path):
    doc = json.loads((FIXTURES / "bench_serve.json").read_text())
    doc["ttfts"][3] = "slow"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"ttfts\[3\] must be a number"):
        _quiet_read(path)


# --------------------------------------------------------------------------
# Phase tables
# --------------------------------------------------------------------------


def test_csv_in_milliseconds_with_mixed_case_types():
    table = read_trace(FIXTURES / "phases_ms.csv", time_unit="ms")
    pd.testing.assert_frame_equal(table, _worked_example())


def test_csv_with_renamed_columns_keeps_n_steps():
    mapping = {
        "req": "request_id",
        "kind": "phase_type",
        "start_ms": "t_start",
        "end_ms": "t_end",
        "p_tok": "prefill_tokens",
        "d_tok": "decode_tokens",
        "steps": "N_steps",
    }
    table = read_trace(FIXTURES / "phases_renamed.csv", time_unit="ms", columns=mapping)
    expected = _worked_example().assign(N_steps=np.array([2, 4, 1, 2]))
    pd.testing.assert_frame_equal(table, expected)


def test_jsonl_and_json_rows():
    pd.testing.assert_frame_equal(
        read_trace(FIXTURES / "phases.jsonl"), _worked_example(ids=(1, 1, 2, 2))
    )
    pd.testing.assert_frame_equal(
        read_trace(FIXTURES / "phases_rows.json"), _worked_example()
    )


def test_parquet_integer_nanoseconds_keep_precision(tmp_path):
    pytest.importorskip("pyarrow")
    base = 1_700_000_000_000_000_000
    raw = _worked_example().assign(
        t_start=base + np.array([0, 2, 1, 3], dtype=np.int64) * 10**9 + 7,
        t_end=base + np.array([2, 6, 3, 5], dtype=np.int64) * 10**9 + 7,
    )
    path = tmp_path / "phases.parquet"
    raw.to_parquet(path)
    table = read_trace(path, time_unit="ns")
    exact = [Decimal(int(v)) / Decimal(10**9) for v in raw["t_start"]]
    _assert_seconds(table["t_start"].to_numpy(), exact, EPOCH_ULP / 2)
    pd.testing.assert_frame_equal(
        table.drop(columns=["t_start", "t_end"]),
        _worked_example().drop(columns=["t_start", "t_end"]),
    )


def test_parquet_datetime_columns(tmp_path):
    pytest.importorskip("pyarrow")
    raw = _worked_example()
    origin = pd.Timestamp("2024-01-01T00:00:00", tz="UTC")
    raw["t_start"] = origin + pd.to_timedelta(raw["t_start"], unit="s")
    raw["t_end"] = origin + pd.to_timedelta(raw["t_end"], unit="s")
    path = tmp_path / "phases.pq"
    raw.to_parquet(path)
    table = read_trace(path)
    np.testing.assert_array_equal(
        table["t_start"] - origin.timestamp(), [0.0, 2.0, 1.0, 3.0]
    )


def test_explicit_format_overrides_extension(tmp_path):
    path = tmp_path / "phases.txt"
    path.write_text((FIXTURES / "phases_ms.csv").read_text())
    table = read_trace(path, format="csv", time_unit="ms")
    pd.testing.assert_frame_equal(table, _worked_example())
    with pytest.raises(ValueError, match=r"phases\.txt.*extension '\.txt'"):
        read_trace(path)


def test_missing_column_is_named():
    with pytest.raises(
        ValueError, match=r"phases_missing_column\.csv: missing column\(s\) \['t_end'\]"
    ):
        read_trace(FIXTURES / "phases_missing_column.csv")


def test_missing_column_after_mapping_mentions_mapping():
    with pytest.raises(ValueError, match=r"missing column\(s\).*columns mapping"):
        read_trace(FIXTURES / "phases_renamed.csv", columns={"req": "request_id"})


def test_non_numeric_time_names_column_and_row():
    with pytest.raises(
        ValueError,
        match=r"phases_bad_time\.csv: column 't_end' has non-numeric value\(s\) "
        r"\['three'\] at data row 3",
    ):
        read_trace(FIXTURES / "phases_bad_time.csv")


def test_non_numeric_time_names_file_column_when_renamed(tmp_path):
    path = tmp_path / "renamed.csv"
    text = (FIXTURES / "phases_renamed.csv").read_text()
    path.write_text(text.replace("1000.0,3000.0", "1000.0,soon"))
    mapping = {
        "req": "request_id",
        "kind": "phase_type",
        "start_ms": "t_start",
        "end_ms": "t_end",
        "p_tok": "prefill_tokens",
        "d_tok": "decode_tokens",
    }
    with pytest.raises(
        ValueError, match=r"column 't_end' \(file column 'end_ms'\).*data row 3"
    ):
        read_trace(path, time_unit="ms", columns=mapping)


def test_bad_json_line_names_line():
    with pytest.raises(
        ValueError, match=r"phases_bad_json_line\.jsonl, line 3: invalid JSON"
    ):
        read_trace(FIXTURES / "phases_bad_json_line.jsonl")


def test_bad_phase_type_lists_values_and_rows(tmp_path):
    path = tmp_path / "phases.csv"
    text = (FIXTURES / "phases_ms.csv").read_text()
    path.write_text(text.replace("B,decode", "B,generate"))
    with pytest.raises(
        ValueError, match=r"column 'phase_type' has value\(s\) \['generate'\].*row 4"
    ):
        read_trace(path)


def test_tokens_required_on_their_phase_rows(tmp_path):
    path = tmp_path / "phases.csv"
    text = (FIXTURES / "phases_ms.csv").read_text()
    path.write_text(text.replace("B,prefill,1000,3000,64,", "B,prefill,1000,3000,,"))
    with pytest.raises(ValueError, match=r"column 'prefill_tokens' is empty.*row 3"):
        read_trace(path)
    path.write_text(text.replace("64,", "64.5,"))
    with pytest.raises(ValueError, match=r"non-integer token count.*64\.5.*row 3"):
        read_trace(path)


def test_bad_columns_mapping():
    with pytest.raises(ValueError, match=r"mapping names column\(s\) \['start'\]"):
        read_trace(FIXTURES / "phases_ms.csv", columns={"start": "t_start"})
    with pytest.raises(ValueError, match=r"targets \['begin'\]"):
        read_trace(FIXTURES / "phases_ms.csv", columns={"t_start": "begin"})
    with pytest.raises(ValueError, match=r"\['t_start'\] appear more than once"):
        read_trace(FIXTURES / "phases_ms.csv", columns={"t_end": "t_start"})


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown format 'xml'"):
        read_trace(FIXTURES / "phases_ms.csv", format="xml")
    with pytest.raises(ValueError, match=r"unknown time_unit 'h'"):
        read_trace(FIXTURES / "phases_ms.csv", time_unit="h")
    with pytest.raises(ValueError, match=r"phase tables only"):
        read_trace(FIXTURES / "otlp_spans.json", time_unit="ms")
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "nope.csv")
    odd = tmp_path / "odd.json"
    odd.write_text('{"hello": "world", "n": 1}\n{"other": 2}\n[1]\n')
    with pytest.raises(ValueError, match=r"odd\.json: cannot tell what this JSON"):
        read_trace(odd)


# --------------------------------------------------------------------------
# write_otlp_spans round trip
# --------------------------------------------------------------------------


def _random_phases(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0.0, 50.0, n))
    prefill = rng.uniform(0.01, 0.5, n)
    decode = rng.uniform(0.05, 3.0, n)
    out_tokens = rng.integers(0, 40, n)
    out_tokens[3] = 0  # a one-token request: prefill row only
    rows = []
    for i in range(n):
        rows.append(
            (f"req-{i}", "prefill", arrival[i], arrival[i] + prefill[i], 1 + 7 * i, 0)
        )
        if out_tokens[i] > 0:
            t = arrival[i] + prefill[i]
            rows.append((f"req-{i}", "decode", t, t + decode[i], 0, out_tokens[i]))
    table = pd.DataFrame(rows, columns=list(PHASE_COLUMNS))
    return table.astype({"prefill_tokens": np.int64, "decode_tokens": np.int64})


def test_round_trip_within_a_nanosecond(tmp_path):
    phases = _random_phases()
    path = write_otlp_spans(phases, tmp_path / "spans.json")
    back = read_trace(path)
    pd.testing.assert_frame_equal(back, phases, check_exact=False, atol=1e-9, rtol=0)
    assert np.abs(back["t_start"] - phases["t_start"]).max() <= 1e-9
    assert np.abs(back["t_end"] - phases["t_end"]).max() <= 1e-9


def test_round_trip_with_epoch_and_integer_ids(tmp_path):
    phases = _worked_example(ids=(7, 7, 9, 9))
    epoch_ns = 1_700_000_000_000_000_000
    back = read_trace(write_otlp_spans(phases, tmp_path / "s.json", epoch_ns=epoch_ns))
    assert back["request_id"].tolist() == [7, 7, 9, 9]
    # Absolute times come back; float64 resolves Unix seconds to ~2.4e-7 s.
    shifted = back["t_start"].to_numpy() - epoch_ns / 1e9
    np.testing.assert_allclose(shifted, phases["t_start"], rtol=0, atol=EPOCH_ULP)
    pd.testing.assert_frame_equal(
        back.drop(columns=["t_start", "t_end"]),
        phases.drop(columns=["t_start", "t_end"]),
    )


def test_writer_rejects_what_a_span_cannot_hold(tmp_path):
    phases = _worked_example()
    gap = phases.copy()
    gap.loc[1, "t_start"] = 2.5
    with pytest.raises(ValueError, match=r"request 'A': decode starts at 2\.5"):
        write_otlp_spans(gap, tmp_path / "x.json")
    orphan = phases.drop(index=0)
    with pytest.raises(ValueError, match=r"request 'A' has a decode row but no"):
        write_otlp_spans(orphan, tmp_path / "x.json")
    twice = pd.concat([phases, phases.iloc[[2]]], ignore_index=True)
    with pytest.raises(ValueError, match=r"request 'B' has more than one prefill"):
        write_otlp_spans(twice, tmp_path / "x.json")
    empty_decode = phases.copy()
    empty_decode.loc[3, "decode_tokens"] = 0
    with pytest.raises(ValueError, match=r"request 'B': decode row has 0 tokens"):
        write_otlp_spans(empty_decode, tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['t_end'\]"):
        write_otlp_spans(phases.drop(columns="t_end"), tmp_path / "x.json")


def test_writer_warns_that_n_steps_is_dropped(tmp_path):
    phases = _worked_example().assign(N_steps=[2, 4, 1, 2])
    with pytest.warns(UserWarning, match="N_steps is not written"):
        path = write_otlp_spans(phases, tmp_path / "s.json")
    assert "N_steps" not in read_trace(path).columns
