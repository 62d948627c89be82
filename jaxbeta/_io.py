"""Readers that turn trace files into the SPEC section 2 phase table.

Every reader returns a :class:`pandas.DataFrame` with the columns

==================  ========  ==================================================
column              dtype     meaning
==================  ========  ==================================================
``request_id``      as read   id of the request the phase belongs to
``phase_type``      str       ``"prefill"`` or ``"decode"`` (lower case)
``t_start``         float64   phase start, seconds
``t_end``           float64   phase end, seconds
``prefill_tokens``  int64     uncached prompt tokens (0 on decode rows)
``decode_tokens``   int64     decode tokens (0 on prefill rows)
``N_steps``         numeric   only when the input has it
==================  ========  ==================================================

in file order. The readers check what they need to parse a file; the
estimators' own validation (durations, duplicate prefill rows, ...) still
runs when the table is fitted.

Timestamps that arrive as integer nanoseconds (OTLP spans, ``time_unit="ns"``
tables) are split into whole seconds and a remainder before they become
float64, so the only rounding is the final one to float64. Note that float64
seconds since the Unix epoch (~1.7e9 s) resolve about 2.4e-7 s; that is the
best any float64-seconds table can do.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PHASE_COLUMNS", "read_trace", "write_otlp_spans"]

PHASE_COLUMNS = (
    "request_id",
    "phase_type",
    "t_start",
    "t_end",
    "prefill_tokens",
    "decode_tokens",
)
"""Required phase-table columns, in output order (SPEC section 2)."""

_OPTIONAL_COLUMNS = ("N_steps",)
_KNOWN_COLUMNS = PHASE_COLUMNS + _OPTIONAL_COLUMNS
_PHASE_TYPES = ("prefill", "decode")

_FORMATS = ("auto", "otlp", "vllm-bench", "csv", "parquet", "jsonl", "json")
_TABLE_FORMATS = ("csv", "parquet", "jsonl", "json")
_UNIT_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
_NS_PER_S = 10**9

# vLLM OpenTelemetry attribute keys (``vllm.tracing.SpanAttributes``).
_SPAN_NAME = "llm_request"
_ATTR_REQUEST_ID = "gen_ai.request.id"
_ATTR_PROMPT = "gen_ai.usage.prompt_tokens"
_ATTR_CACHED = "gen_ai.usage.cached_tokens"
_ATTR_COMPLETION = "gen_ai.usage.completion_tokens"
_ATTR_TTFT = "gen_ai.latency.time_to_first_token"
_ATTR_PREFILL = "gen_ai.latency.time_in_model_prefill"
_ATTR_DECODE = "gen_ai.latency.time_in_model_decode"
_ATTR_QUEUE = "gen_ai.latency.time_in_queue"
_ATTR_E2E = "gen_ai.latency.e2e"

# Any of these in a single JSON object marks vllm bench serve results (so a
# file missing one of them still gets the bench reader's precise error).
_BENCH_KEYS = {"ttfts", "itls", "input_lens", "output_lens", "start_times"}

_MAX_LISTED = 5  # how many offending rows/values an error message shows


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def read_trace(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    time_unit: str = "s",
    columns: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Read a trace file into a phase table (SPEC section 2).

    Supported inputs:

    * ``"otlp"``: vLLM OpenTelemetry ``llm_request`` spans in OTLP JSON, as
      the OpenTelemetry collector's file exporter writes them: one
      ``{"resourceSpans": [...]}`` object, or one such object per line
      (JSON Lines). For each span, with ``t1 = span start +
      time_to_first_token`` (seconds), the prefill phase is
      ``[t1 - time_in_model_prefill, t1]`` with ``prompt_tokens -
      cached_tokens`` tokens and the decode phase is ``[t1, t1 +
      time_in_model_decode]`` with ``completion_tokens - 1`` tokens (the
      first token comes from the last prefill step, so a one-token request
      has no decode row). ``request_id`` is ``gen_ai.request.id``, else the
      span id. Spans with other names are skipped with one warning.
    * ``"vllm-bench"``: the detailed JSON of ``vllm bench serve
      --save-result --save-detailed``. Needs the per-request lists
      ``start_times``, ``ttfts``, ``input_lens``, ``output_lens`` and a
      latency source: ``e2els`` or ``latencies`` (seconds), else ``ttft +
      sum(itls)``. Prefill is ``[start, start + ttft]`` with ``input_len``
      tokens, decode ``[start + ttft, start + latency]`` with
      ``output_len - 1`` tokens. Requests with a non-empty ``errors`` entry
      are dropped (one warning). These are client-side times that include
      queueing and network time, so a warning says so. ``request_id`` is the
      request's position in the lists.
    * ``"csv"``, ``"parquet"``, ``"jsonl"`` (one row object per line),
      ``"json"`` (a list of row objects): a phase table. ``columns`` renames
      file columns to the canonical names and ``time_unit`` gives the unit of
      ``t_start``/``t_end``; datetime columns (Parquet timestamps) are read
      as seconds since the Unix epoch regardless of ``time_unit``.
      ``prefill_tokens`` may be empty on decode rows and ``decode_tokens``
      on prefill rows (read as 0).
    * ``"auto"``: by extension (``.csv``; ``.parquet``/``.pq``; ``.json``,
      ``.jsonl``, ``.ndjson``) and, for JSON, by content: ``resourceSpans``
      means OTLP; one object with ``ttfts`` (or another of the bench lists)
      means vllm-bench; a list of row objects, or one object per line, means
      a phase table.

    Args:
      path: file to read.
      format: one of ``"auto"``, ``"otlp"``, ``"vllm-bench"``, ``"csv"``,
        ``"parquet"``, ``"jsonl"``, ``"json"``.
      time_unit: unit of ``t_start``/``t_end`` in a phase table: ``"s"``,
        ``"ms"``, ``"us"`` or ``"ns"``. OTLP and vllm-bench files define
        their own units, so only ``"s"`` (the default) is accepted for them.
      columns: mapping from file column names to canonical names, e.g.
        ``{"start_ms": "t_start"}``; phase tables only.

    Returns:
      The phase table: ``request_id``, ``phase_type``, ``t_start`` and
      ``t_end`` (seconds, float64), ``prefill_tokens`` and ``decode_tokens``
      (int64), plus ``N_steps`` when the file has it; rows in file order.

    Raises:
      ValueError: unknown format or unit, unreadable content, or a missing or
        malformed field; the message names the file and the line, span, row
        and column at fault.
      FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if format not in _FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {_FORMATS}")
    if time_unit not in _UNIT_PER_SECOND:
        raise ValueError(
            f"unknown time_unit {time_unit!r}; expected one of "
            f"{tuple(_UNIT_PER_SECOND)}"
        )
    if columns is not None and not isinstance(columns, Mapping):
        raise ValueError(
            f"columns must be a mapping from file column names to canonical "
            f"names, got {type(columns).__name__}"
        )
    if not path.exists():
        raise FileNotFoundError(f"no such trace file: {path}")

    fmt = format
    docs: list[tuple[int | None, Any]] | None = None
    if fmt == "auto":
        fmt = _format_from_suffix(path)
    if fmt in ("otlp", "vllm-bench", "jsonl", "json", "auto-json"):
        docs = _load_json_documents(path)
        if fmt == "auto-json":
            fmt = _format_from_content(docs, path)

    if fmt in ("otlp", "vllm-bench"):
        if time_unit != "s" or columns:
            raise ValueError(
                f"{path}: time_unit and columns apply to phase tables only; "
                f"{fmt} files define their own field names and units"
            )

    notes: list[str] = []
    if fmt == "otlp":
        table = _read_otlp(docs, path, notes)
    elif fmt == "vllm-bench":
        table = _read_vllm_bench(docs, path, notes)
    else:
        raw, locate = _load_table(path, fmt, docs)
        table = _normalise_table(raw, path, locate, time_unit, columns)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return table


# --------------------------------------------------------------------------
# Format detection and JSON loading
# --------------------------------------------------------------------------


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".json", ".jsonl", ".ndjson"):
        return "auto-json"
    raise ValueError(
        f"{path}: cannot tell the format from the extension {suffix!r}; pass "
        f"format= one of {_FORMATS[1:]}"
    )


def _load_json_documents(path: Path) -> list[tuple[int | None, Any]]:
    """Parse ``path`` as one JSON document or, failing that, as JSON Lines.

    Returns ``[(None, doc)]`` for a single document and ``[(line_no, obj),
    ...]`` (1-based line numbers, blank lines skipped) for JSON Lines.
    """
    text = path.read_text(encoding="utf-8")
    try:
        return [(None, json.loads(text))]
    except json.JSONDecodeError as err:
        # JSON Lines parse as a first document followed by "Extra data";
        # anything else is a broken document (or a broken first line).
        if err.msg != "Extra data":
            raise ValueError(
                f"{path}, line {err.lineno}: invalid JSON ({err.msg} at column "
                f"{err.colno})"
            ) from None
    docs: list[tuple[int | None, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            docs.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {line_no}: invalid JSON ({err.msg} at column "
                f"{err.colno})"
            ) from None
    if not docs:
        raise ValueError(f"{path}: file holds no JSON")
    return docs


def _format_from_content(docs: list[tuple[int | None, Any]], path: Path) -> str:
    first = docs[0][1]
    if isinstance(first, dict) and "resourceSpans" in first:
        return "otlp"
    if len(docs) == 1 and isinstance(first, dict) and _BENCH_KEYS & set(first):
        return "vllm-bench"
    if len(docs) == 1 and isinstance(first, list):
        return "json"
    if all(isinstance(doc, dict) for _, doc in docs):
        return "jsonl"
    raise ValueError(
        f"{path}: cannot tell what this JSON holds (expected an OTLP object "
        f"with 'resourceSpans', vllm bench serve results with 'ttfts', or "
        f"phase-table row objects); pass format= explicitly"
    )


def _where(path: Path, line_no: int | None) -> str:
    return f"{path}" if line_no is None else f"{path}, line {line_no}"


# --------------------------------------------------------------------------
# OTLP JSON spans
# --------------------------------------------------------------------------


def _iter_spans(
    docs: list[tuple[int | None, Any]], path: Path
) -> Iterator[tuple[str, dict]]:
    for line_no, doc in docs:
        where = _where(path, line_no)
        if not isinstance(doc, dict) or "resourceSpans" not in doc:
            raise ValueError(
                f"{where}: expected an OTLP JSON object with 'resourceSpans'"
            )
        for resource_spans in doc["resourceSpans"] or []:
            scopes = resource_spans.get("scopeSpans")
            if scopes is None:  # field name before OTLP 0.19
                scopes = resource_spans.get("instrumentationLibrarySpans", [])
            for scope_spans in scopes or []:
                for span in scope_spans.get("spans") or []:
                    if not isinstance(span, dict):
                        raise ValueError(f"{where}: a span is not a JSON object")
                    yield where, span


def _parse_unix_nano(value: Any, loc: str, key: str) -> int:
    """Parse an OTLP ``*UnixNano`` field (decimal string or JSON integer)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{loc}: missing or invalid {key} {value!r}")
    if isinstance(value, int):
        ns = value
    elif isinstance(value, str) and value.strip().isdigit():
        ns = int(value.strip())
    else:
        raise ValueError(
            f"{loc}: {key} must be a decimal string of integer nanoseconds, "
            f"got {value!r}"
        )
    if ns < 0:
        raise ValueError(f"{loc}: {key} is negative ({ns})")
    return ns


def _attribute_map(raw: Any, loc: str) -> dict[str, Any]:
    """Flatten OTLP ``attributes`` (``[{key, value: {xxxValue: v}}]``)."""
    out: dict[str, Any] = {}
    for item in raw or []:
        if not isinstance(item, dict) or "key" not in item:
            raise ValueError(f"{loc}: malformed attribute entry {item!r}")
        value = item.get("value") or {}
        if "intValue" in value:
            out[item["key"]] = ("int", value["intValue"])
        elif "doubleValue" in value:
            out[item["key"]] = ("double", value["doubleValue"])
        elif "stringValue" in value:
            out[item["key"]] = ("string", value["stringValue"])
        elif "boolValue" in value:
            out[item["key"]] = ("bool", value["boolValue"])
        else:
            out[item["key"]] = ("other", value)
    return out


def _int_attr(attrs: dict, key: str, loc: str) -> int:
    kind, value = attrs[key]
    try:
        if kind == "int" and not isinstance(value, bool | float):
            return int(value)  # OTLP JSON encodes int64 as a decimal string
        if kind == "double" and float(value).is_integer():
            return int(float(value))
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{loc}: attribute {key!r} must be an integer, got {value!r}")


def _seconds_attr(attrs: dict, key: str, loc: str) -> float:
    kind, value = attrs[key]
    try:
        if kind in ("double", "int") and not isinstance(value, bool):
            seconds = float(value)
            if np.isfinite(seconds) and seconds >= 0:
                return seconds
    except (TypeError, ValueError):
        pass
    raise ValueError(
        f"{loc}: attribute {key!r} must be a finite, non-negative number of "
        f"seconds, got {value!r}"
    )


def _attr_value(attrs: dict, key: str) -> Any:
    kind, value = attrs[key]
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            return value
    return value


def _read_otlp(
    docs: list[tuple[int | None, Any]], path: Path, notes: list[str]
) -> pd.DataFrame:
    ids: list[Any] = []
    kinds: list[str] = []
    base_s: list[int] = []  # whole seconds of the span start
    rel_start: list[float] = []  # seconds after base_s
    rel_end: list[float] = []
    pf_tokens: list[int] = []
    dec_tokens: list[int] = []
    skipped: dict[str, int] = {}

    for where, span in _iter_spans(docs, path):
        name = span.get("name")
        if name != _SPAN_NAME:
            skipped[str(name)] = skipped.get(str(name), 0) + 1
            continue
        span_id = span.get("spanId") or "<no spanId>"
        loc = f"{where}, span {span_id!r}"
        start_ns = _parse_unix_nano(
            span.get("startTimeUnixNano"), loc, "startTimeUnixNano"
        )
        if "endTimeUnixNano" in span:
            _parse_unix_nano(span["endTimeUnixNano"], loc, "endTimeUnixNano")
        attrs = _attribute_map(span.get("attributes"), loc)

        needed = [_ATTR_TTFT, _ATTR_PREFILL, _ATTR_PROMPT, _ATTR_COMPLETION]
        missing = [key for key in needed if key not in attrs]
        if missing:
            raise ValueError(
                f"{loc}: llm_request span lacks attribute(s) "
                f"{', '.join(repr(k) for k in missing)}"
            )
        completion = _int_attr(attrs, _ATTR_COMPLETION, loc)
        if completion < 1:
            raise ValueError(
                f"{loc}: {_ATTR_COMPLETION} is {completion}; a request that "
                f"produced no token has no phases to read"
            )
        if completion > 1 and _ATTR_DECODE not in attrs:
            raise ValueError(
                f"{loc}: llm_request span lacks attribute {_ATTR_DECODE!r} "
                f"(needed because {_ATTR_COMPLETION} = {completion} > 1)"
            )
        prompt = _int_attr(attrs, _ATTR_PROMPT, loc)
        cached = _int_attr(attrs, _ATTR_CACHED, loc) if _ATTR_CACHED in attrs else 0
        if not 0 <= cached <= prompt:
            raise ValueError(
                f"{loc}: {_ATTR_CACHED} = {cached} is outside [0, "
                f"{_ATTR_PROMPT} = {prompt}]"
            )
        ttft = _seconds_attr(attrs, _ATTR_TTFT, loc)
        prefill = _seconds_attr(attrs, _ATTR_PREFILL, loc)
        request_id = (
            _attr_value(attrs, _ATTR_REQUEST_ID)
            if _ATTR_REQUEST_ID in attrs
            else span_id
        )

        # Work relative to the span's whole second so that adding the
        # (small) latencies does not lose the nanoseconds of the start time.
        whole, rem = divmod(start_ns, _NS_PER_S)
        t1 = rem / 1e9 + ttft
        ids.append(request_id)
        kinds.append("prefill")
        base_s.append(whole)
        rel_start.append(t1 - prefill)
        rel_end.append(t1)
        pf_tokens.append(prompt - cached)
        dec_tokens.append(0)
        if completion > 1:
            decode = _seconds_attr(attrs, _ATTR_DECODE, loc)
            ids.append(request_id)
            kinds.append("decode")
            base_s.append(whole)
            rel_start.append(t1)
            rel_end.append(t1 + decode)
            pf_tokens.append(0)
            dec_tokens.append(completion - 1)

    if skipped:
        total = sum(skipped.values())
        names = ", ".join(f"{n!r} x{c}" for n, c in sorted(skipped.items()))
        notes.append(
            f"{path}: skipped {total} span(s) not named {_SPAN_NAME!r} ({names})"
        )
    base = np.asarray(base_s, dtype=np.int64).astype(np.float64)
    return _make_table(
        ids,
        kinds,
        base + np.asarray(rel_start, dtype=np.float64),
        base + np.asarray(rel_end, dtype=np.float64),
        pf_tokens,
        dec_tokens,
    )


def _make_table(ids, kinds, t_start, t_end, pf_tokens, dec_tokens) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": pd.Series(ids, dtype=None if ids else object),
            "phase_type": pd.Series(kinds, dtype=str),
            "t_start": np.asarray(t_start, dtype=np.float64),
            "t_end": np.asarray(t_end, dtype=np.float64),
            "prefill_tokens": np.asarray(pf_tokens, dtype=np.int64),
            "decode_tokens": np.asarray(dec_tokens, dtype=np.int64),
        }
    )


def write_otlp_spans(
    phases: pd.DataFrame,
    path: str | os.PathLike,
    *,
    epoch_ns: int = 0,
) -> Path:
    """Write a phase table as OTLP JSON ``llm_request`` spans.

    The inverse of :func:`read_trace` for OTLP: reading the file back gives
    the same table (timestamps to within float64 rounding, i.e. about 1 ns
    for times of up to ~1e6 s). Each request becomes one span whose start is
    its prefill start (zero queue time), with ``time_to_first_token`` and
    ``time_in_model_prefill`` both equal to the prefill duration,
    ``time_in_model_decode`` the decode duration (0 without a decode row),
    ``prompt_tokens`` = ``prefill_tokens`` (no cached tokens) and
    ``completion_tokens`` = ``decode_tokens + 1``. Integer request ids are
    written as ``intValue`` and read back as ints; other ids as strings.
    Spans follow the order in which requests first appear in ``phases``.
    ``N_steps`` cannot be expressed in a span and is not written (a warning
    says so).

    Args:
      phases: phase table with the SPEC section 2 columns (``t_start`` and
        ``t_end`` in seconds): exactly one prefill row per request and at
        most one decode row, which must start where the prefill ends (a span
        cannot express a gap) and hold at least one token.
      path: output file (one JSON object, indented).
      epoch_ns: Unix time in integer nanoseconds of ``t = 0``; span times are
        ``epoch_ns + round(t * 1e9)``. With the default 0 the times are
        written as given, so a table already in Unix seconds stays in Unix
        seconds. ``read_trace`` returns absolute times, i.e. ``t +
        epoch_ns / 1e9``.

    Returns:
      The path written.

    Raises:
      ValueError: the table cannot be written as spans (missing columns, a
        request without a prefill row, two prefill or decode rows for one
        request, a decode row that does not start at the prefill end, ...).
    """
    missing = [c for c in PHASE_COLUMNS if c not in phases.columns]
    if missing:
        raise ValueError(f"phases lacks column(s) {missing}")
    if "N_steps" in phases.columns:
        warnings.warn(
            "write_otlp_spans: OTLP spans have no step counts; N_steps is not written",
            UserWarning,
            stacklevel=2,
        )
    kind = phases["phase_type"].astype(str).str.strip().str.lower().to_numpy()
    bad = sorted(set(kind) - set(_PHASE_TYPES))
    if bad:
        raise ValueError(f"phases has phase_type value(s) {bad}")

    by_request: dict[Any, dict[str, int]] = {}
    request_ids = phases["request_id"].tolist()
    for row, (rid, k) in enumerate(zip(request_ids, kind, strict=True)):
        slots = by_request.setdefault(rid, {})
        if k in slots:
            raise ValueError(
                f"request {rid!r} has more than one {k} row (rows {slots[k]} "
                f"and {row}); a span holds one of each"
            )
        slots[k] = row

    # Plain Python floats and ints from here on (exact repr in messages).
    t_start = phases["t_start"].to_numpy(dtype=np.float64).tolist()
    t_end = phases["t_end"].to_numpy(dtype=np.float64).tolist()
    pf_tok = phases["prefill_tokens"].tolist()
    dec_tok = phases["decode_tokens"].tolist()

    spans = []
    for i, (rid, slots) in enumerate(by_request.items()):
        if "prefill" not in slots:
            raise ValueError(f"request {rid!r} has a decode row but no prefill row")
        p = slots["prefill"]
        start_ns = epoch_ns + _seconds_to_ns(t_start[p])
        prefill_s = float(t_end[p] - t_start[p])
        decode_s = 0.0
        completion = 1
        end_ns = epoch_ns + _seconds_to_ns(t_end[p])
        if "decode" in slots:
            d = slots["decode"]
            if abs(t_start[d] - t_end[p]) > 1e-9:
                raise ValueError(
                    f"request {rid!r}: decode starts at {t_start[d]!r} s but "
                    f"prefill ends at {t_end[p]!r} s; a span cannot express "
                    f"the gap"
                )
            if int(dec_tok[d]) < 1:
                raise ValueError(
                    f"request {rid!r}: decode row has {dec_tok[d]} tokens; a "
                    f"span needs at least one decode token to have a decode "
                    f"phase"
                )
            decode_s = float(t_end[d] - t_start[d])
            completion = int(dec_tok[d]) + 1
            end_ns = epoch_ns + _seconds_to_ns(t_end[d])
        if isinstance(rid, int | np.integer) and not isinstance(rid, bool):
            rid_value = {"intValue": str(int(rid))}
        else:
            rid_value = {"stringValue": str(rid)}
        attributes = [
            {"key": _ATTR_REQUEST_ID, "value": rid_value},
            {"key": _ATTR_PROMPT, "value": {"intValue": str(int(pf_tok[p]))}},
            {"key": _ATTR_COMPLETION, "value": {"intValue": str(completion)}},
            {"key": _ATTR_QUEUE, "value": {"doubleValue": 0.0}},
            {"key": _ATTR_TTFT, "value": {"doubleValue": prefill_s}},
            {"key": _ATTR_PREFILL, "value": {"doubleValue": prefill_s}},
            {"key": _ATTR_DECODE, "value": {"doubleValue": decode_s}},
            {"key": _ATTR_E2E, "value": {"doubleValue": prefill_s + decode_s}},
        ]
        spans.append(
            {
                "traceId": f"{i + 1:032x}",
                "spanId": f"{i + 1:016x}",
                "name": _SPAN_NAME,
                "kind": 2,  # SPAN_KIND_SERVER, as vLLM emits it
                "startTimeUnixNano": str(start_ns),
                "endTimeUnixNano": str(max(end_ns, start_ns)),
                "attributes": attributes,
                "status": {},
            }
        )
    doc = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "jaxbeta"}}
                    ]
                },
                "scopeSpans": [
                    {"scope": {"name": "jaxbeta.write_otlp_spans"}, "spans": spans}
                ],
            }
        ]
    }
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def _seconds_to_ns(seconds: float) -> int:
    """Float seconds to integer nanoseconds without going through 1e18."""
    seconds = float(seconds)
    if not np.isfinite(seconds):
        raise ValueError(f"cannot write non-finite time {seconds!r}")
    whole = int(np.floor(seconds))
    frac = seconds - whole  # exact: both are floats within a factor of 2^53
    return whole * _NS_PER_S + int(round(frac * 1e9))


# --------------------------------------------------------------------------
# vllm bench serve detailed results
# --------------------------------------------------------------------------


def _read_vllm_bench(
    docs: list[tuple[int | None, Any]], path: Path, notes: list[str]
) -> pd.DataFrame:
    if len(docs) != 1 or not isinstance(docs[0][1], dict):
        raise ValueError(
            f"{path}: vllm bench serve results are one JSON object, not JSON "
            f"Lines or a list"
        )
    doc = docs[0][1]
    required = ["start_times", "ttfts", "input_lens", "output_lens"]
    latency_key = next((k for k in ("e2els", "latencies") if k in doc), None)
    if latency_key is None and "itls" in doc:
        latency_key = "itls"
    missing = [k for k in required if k not in doc]
    if latency_key is None:
        missing.append("e2els (or latencies, or itls)")
    if missing:
        hint = (
            " (start_times is written by recent vLLM with --save-detailed; "
            "without it requests cannot be placed in time)"
            if "start_times" in missing
            else ""
        )
        raise ValueError(
            f"{path}: vllm bench serve results lack key(s) "
            f"{', '.join(repr(k) for k in missing)}{hint}"
        )
    used = [*required, latency_key]
    if "errors" in doc:
        used.append("errors")
    lists = {}
    for key in used:
        if not isinstance(doc[key], list):
            raise ValueError(
                f"{path}: {key!r} must be a per-request list, got "
                f"{type(doc[key]).__name__}"
            )
        lists[key] = doc[key]
    lengths = {key: len(values) for key, values in lists.items()}
    if len(set(lengths.values())) > 1:
        counts = list(lengths.values())
        usual = max(set(counts), key=counts.count)
        odd = [k for k, n in lengths.items() if n != usual]
        shown = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(
            f"{path}: per-request list(s) {odd} differ in length from the "
            f"others ({usual} entries): {shown}"
        )

    notes.append(
        f"{path}: vllm bench serve times are client-side approximations: "
        f"prefill phases include queueing and network time and decode phases "
        f"include network time, so phase durations are overstated; prefer "
        f"server-side spans (format='otlp') when you have them"
    )
    n = lengths["ttfts"]
    errors = lists.get("errors", [""] * n)
    failed = [bool(e) for e in errors]
    if any(failed):
        notes.append(
            f"{path}: dropped {sum(failed)} failed request(s) (non-empty "
            f"'errors' entry)"
        )

    def number(key: str, i: int) -> float:
        value = lists[key][i]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: {key}[{i}] must be a number, got {value!r}")
        if not np.isfinite(value):
            raise ValueError(f"{path}: {key}[{i}] is not finite ({value!r})")
        return float(value)

    def count(key: str, i: int) -> int:
        value = number(key, i)
        if not value.is_integer() or value < 0:
            raise ValueError(
                f"{path}: {key}[{i}] must be a non-negative integer, got "
                f"{lists[key][i]!r}"
            )
        return int(value)

    ids, kinds, t0, t1, pf, dec = [], [], [], [], [], []
    for i in range(n):
        if failed[i]:
            continue
        start = number("start_times", i)
        ttft = number("ttfts", i)
        if latency_key == "itls":
            gaps = lists["itls"][i]
            ok = isinstance(gaps, list) and all(
                isinstance(g, int | float) and not isinstance(g, bool) for g in gaps
            )
            if not ok:
                raise ValueError(
                    f"{path}: itls[{i}] must be a list of inter-token gaps in "
                    f"seconds, got {gaps!r}"
                )
            latency = ttft + float(np.sum(np.asarray(gaps, dtype=np.float64)))
        else:
            latency = number(latency_key, i)
        input_len = count("input_lens", i)
        output_len = count("output_lens", i)
        ids.append(i)
        kinds.append("prefill")
        t0.append(start)
        t1.append(start + ttft)
        pf.append(input_len)
        dec.append(0)
        if output_len > 1:
            ids.append(i)
            kinds.append("decode")
            t0.append(start + ttft)
            t1.append(start + latency)
            pf.append(0)
            dec.append(output_len - 1)
    return _make_table(ids, kinds, t0, t1, pf, dec)


# --------------------------------------------------------------------------
# Phase tables (CSV, Parquet, JSON, JSON Lines)
# --------------------------------------------------------------------------


def _load_table(path: Path, fmt: str, docs) -> tuple[pd.DataFrame, Any]:
    """Load a raw table and a function mapping a row position to a location."""
    if fmt == "csv":
        try:
            raw = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise ValueError(f"{path}: cannot parse CSV ({err})") from None
        return raw, lambda i: f"data row {i + 1}"
    if fmt == "parquet":
        try:
            raw = pd.read_parquet(path)
        except ImportError as err:
            raise ImportError(
                "reading Parquet needs pyarrow: pip install 'jaxbeta[parquet]'"
            ) from err
        return raw, lambda i: f"row {i}"
    if fmt == "json":
        if len(docs) != 1 or not isinstance(docs[0][1], list):
            raise ValueError(
                f"{path}: a JSON phase table is a list of row objects; use "
                f"format='jsonl' for one object per line"
            )
        rows = docs[0][1]
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise ValueError(f"{path}: entry {bad[0]} of the list is not an object")
        return pd.DataFrame.from_records(rows), lambda i: f"row {i}"
    # jsonl
    rows, lines = [], []
    for line_no, doc in docs:
        if not isinstance(doc, dict):
            where = _where(path, line_no)
            raise ValueError(f"{where}: expected one row object per line")
        rows.append(doc)
        lines.append(line_no if line_no is not None else 1)
    return pd.DataFrame.from_records(rows), lambda i: f"line {lines[i]}"


def _rows_text(locate, positions: np.ndarray) -> str:
    shown = ", ".join(locate(int(i)) for i in positions[:_MAX_LISTED])
    more = len(positions) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _apply_mapping(
    raw: pd.DataFrame, path: Path, columns: Mapping[str, str] | None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rename file columns; return the table and canonical -> file names."""
    columns = dict(columns or {})
    absent = [src for src in columns if src not in raw.columns]
    if absent:
        raise ValueError(
            f"{path}: columns mapping names column(s) {absent} that the file "
            f"lacks; file columns: {list(raw.columns)}"
        )
    unknown = sorted({dst for dst in columns.values() if dst not in _KNOWN_COLUMNS})
    if unknown:
        raise ValueError(
            f"{path}: columns mapping targets {unknown} are not phase-table "
            f"columns; "
            f"expected some of {list(_KNOWN_COLUMNS)}"
        )
    renamed = raw.rename(columns=columns)
    dupes = sorted({c for c in renamed.columns if list(renamed.columns).count(c) > 1})
    if dupes:
        raise ValueError(
            f"{path}: after applying the columns mapping, column(s) {dupes} "
            f"appear more than once"
        )
    origin = {dst: src for src, dst in columns.items()}
    return renamed, origin


def _normalise_table(
    raw: pd.DataFrame,
    path: Path,
    locate,
    time_unit: str,
    columns: Mapping[str, str] | None,
) -> pd.DataFrame:
    table, origin = _apply_mapping(raw, path, columns)
    missing = [c for c in PHASE_COLUMNS if c not in table.columns]
    if missing:
        mapping = ""
        if columns:
            mapping = f" (after applying columns mapping {dict(columns)})"
        raise ValueError(
            f"{path}: missing column(s) {missing}{mapping}; file columns: "
            f"{list(raw.columns)}"
        )

    def name(col: str) -> str:
        src = origin.get(col)
        return f"column {col!r}" + (f" (file column {src!r})" if src else "")

    kind = table["phase_type"]
    blank = kind.isna().to_numpy()
    if blank.any():
        raise ValueError(
            f"{path}: {name('phase_type')} is empty at "
            f"{_rows_text(locate, np.flatnonzero(blank))}"
        )
    kind = kind.astype(str).str.strip().str.lower()
    bad = ~kind.isin(_PHASE_TYPES).to_numpy()
    if bad.any():
        values = sorted(set(table["phase_type"][bad].astype(str)))
        raise ValueError(
            f"{path}: {name('phase_type')} has value(s) {values} (expected "
            f"'prefill' or 'decode', any case) at "
            f"{_rows_text(locate, np.flatnonzero(bad))}"
        )
    is_prefill = (kind == "prefill").to_numpy()

    out = {
        "request_id": table["request_id"].reset_index(drop=True),
        "phase_type": kind.reset_index(drop=True).astype(str),
    }
    if table["request_id"].isna().any():
        rows = np.flatnonzero(table["request_id"].isna().to_numpy())
        raise ValueError(
            f"{path}: {name('request_id')} is empty at {_rows_text(locate, rows)}"
        )
    for col in ("t_start", "t_end"):
        out[col] = _to_seconds(table[col], time_unit, path, name(col), locate)
    out["prefill_tokens"] = _token_counts(
        table["prefill_tokens"], is_prefill, path, name("prefill_tokens"), locate
    )
    out["decode_tokens"] = _token_counts(
        table["decode_tokens"], ~is_prefill, path, name("decode_tokens"), locate
    )
    if "N_steps" in table.columns:
        out["N_steps"] = _step_counts(table["N_steps"], path, name("N_steps"), locate)
    return pd.DataFrame(out)


def _numeric(series: pd.Series, path: Path, what: str, locate) -> pd.Series:
    """Coerce to numbers; a value that is present but not a number is an error."""
    if pd.api.types.is_bool_dtype(series):
        raise ValueError(f"{path}: {what} holds booleans, not numbers")
    if pd.api.types.is_numeric_dtype(series):
        return series
    numbers = pd.to_numeric(series, errors="coerce")
    bad = (numbers.isna() & series.notna()).to_numpy()
    if bad.any():
        rows = np.flatnonzero(bad)
        values = [series.iloc[i] for i in rows[:_MAX_LISTED]]
        raise ValueError(
            f"{path}: {what} has non-numeric value(s) {values} at "
            f"{_rows_text(locate, rows)}"
        )
    return numbers


def _to_seconds(
    series: pd.Series, unit: str, path: Path, what: str, locate
) -> np.ndarray:
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(series):
        if series.isna().any():
            rows = np.flatnonzero(series.isna().to_numpy())
            raise ValueError(f"{path}: {what} is empty at {_rows_text(locate, rows)}")
        ns = series.astype("datetime64[ns]").astype(np.int64).to_numpy()
        return _ns_to_seconds(ns)
    numbers = _numeric(series, path, what, locate)
    if numbers.isna().any():
        rows = np.flatnonzero(numbers.isna().to_numpy())
        raise ValueError(
            f"{path}: {what} is empty or NaN at {_rows_text(locate, rows)}"
        )
    per_second = _UNIT_PER_SECOND[unit]
    if pd.api.types.is_integer_dtype(numbers):
        values = numbers.to_numpy(dtype=np.int64)
        whole, rem = np.divmod(values, per_second)
        return whole.astype(np.float64) + rem / float(per_second)
    values = numbers.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        rows = np.flatnonzero(~np.isfinite(values))
        raise ValueError(f"{path}: {what} is not finite at {_rows_text(locate, rows)}")
    return values / per_second if per_second != 1 else values


def _ns_to_seconds(ns: Any) -> np.ndarray:
    """Integer nanoseconds to float64 seconds with a single final rounding."""
    whole, rem = np.divmod(np.asarray(ns, dtype=np.int64), _NS_PER_S)
    return whole.astype(np.float64) + rem / 1e9


def _token_counts(
    series: pd.Series, needed: np.ndarray, path: Path, what: str, locate
) -> np.ndarray:
    numbers = _numeric(series, path, what, locate)
    numbers = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    empty = np.isnan(numbers)
    if (empty & needed).any():
        rows = np.flatnonzero(empty & needed)
        raise ValueError(
            f"{path}: {what} is empty on row(s) of that phase type at "
            f"{_rows_text(locate, rows)}"
        )
    numbers = np.where(empty, 0.0, numbers)
    bad = ~np.isfinite(numbers) | (np.abs(numbers - np.rint(numbers)) > 1e-6)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{path}: {what} has non-integer token count(s) "
            f"{numbers[rows[:_MAX_LISTED]].tolist()} at {_rows_text(locate, rows)}"
        )
    return np.rint(numbers).astype(np.int64)


def _step_counts(series: pd.Series, path: Path, what: str, locate) -> np.ndarray:
    numbers = _numeric(series, path, what, locate)
    numbers = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isfinite(numbers).all() and (numbers == np.rint(numbers)).all():
        return numbers.astype(np.int64)
    return numbers  # the estimators' validation reports what is wrong
